"""LLM teachers: a prompted causal LM's label-word log-probabilities as soft labels, with tiny causal LMs
(GPT-2 and Llama shapes) and a byte-level BPE tokenizer trained offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import LABELS, byte_level_bpe, random_posts

from kd_ray.config import TeacherConfig
from kd_ray.errors import ModelError
from kd_ray.models.teacher import CALIBRATION, TeacherLabeler, make_teacher

PROMPT = "Tweet: {text}\nSentiment:"
CHAT_TEMPLATE = ("{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def build_tiny_causal_lm(folder: Path, family: str, seed: int = 0) -> Path:
    """A random causal LM whose byte-level BPE tokenizer has ' negative', ' neutral', ' positive' as tokens."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    lines = [PROMPT.format(text=p) + f" {LABELS[i % 3]}" for i, p in enumerate(random_posts(300, seed=2))]
    tok = byte_level_bpe(lines * 3, ["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    size = tok.get_vocab_size()
    config = (GPT2Config(vocab_size=size, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                         bos_token_id=0, eos_token_id=0) if family == "gpt2" else
              LlamaConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=0, eos_token_id=0))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper next-token distributions than the tiny init gives
        for p in model.parameters():
            p.mul_(4.0) if p.ndim == 2 else None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal_lm(request, tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llm") / request.param, request.param)


def describe(cfg):
    return make_teacher(cfg, hash_weights=True).info


def llm_teacher(model: Path, **more) -> TeacherConfig:
    return TeacherConfig(model=str(model), kind="llm", prompt=PROMPT, labels=LABELS, max_length=64, **more)


def rows(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table({"id": [str(i) for i in range(n)], "text": texts, "label": pa.nulls(n, pa.int32()),
                     "reject_reason": pa.nulls(n, pa.string())})


def direct_log_probs(model_dir: Path, prompts: list[str], words: list[str | list[str]],
                     chat: bool = False) -> np.ndarray:
    """Each prompt alone (no padding) through transformers: log-softmax of the last position's logits, the
    probabilities of a label's words added."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    groups = [[tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ([ws] if isinstance(ws, str) else ws)]
              for ws in words]
    out = []
    with torch.no_grad():
        for prompt in prompts:
            if chat:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
                enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            else:
                enc = tokenizer(prompt, return_tensors="pt")
            logp = torch.log_softmax(model(**enc).logits[0, -1], dim=-1)
            out.append([torch.logsumexp(logp[g], dim=0).item() for g in groups])
    return np.array(out)


def test_logits_are_the_label_words_log_probabilities_of_a_direct_run(causal_lm):
    texts = random_posts(11, seed=4, min_words=1, max_words=25)  # mixed lengths: left-padded batches
    labeler = TeacherLabeler([llm_teacher(causal_lm)], batch_size=4)
    out = labeler(rows(texts))
    stored = np.array(out.column("teacher_logits").to_pylist())
    expected = direct_log_probs(causal_lm, [PROMPT.format(text=t) for t in texts], [f" {w}" for w in LABELS])
    np.testing.assert_allclose(stored, expected, atol=1e-4)
    assert (stored <= 0).all()  # log-probabilities, over the whole vocabulary
    assert not out.column("truncated").to_numpy(zero_copy_only=False).any()


def test_several_words_of_a_label_add_up_and_a_chat_template_wraps_the_prompt(causal_lm):
    texts = random_posts(7, seed=5, min_words=1, max_words=20)
    verbalizer = {"negative": [" negative", " bad"], "neutral": " neutral", "positive": [" positive", " great"]}
    out = TeacherLabeler([llm_teacher(causal_lm, verbalizer=verbalizer, chat=True)], batch_size=3)(rows(texts))
    words = [verbalizer[label] for label in LABELS]
    expected = direct_log_probs(causal_lm, [PROMPT.format(text=t) for t in texts], words, chat=True)
    np.testing.assert_allclose(np.array(out.column("teacher_logits").to_pylist()), expected, atol=1e-4)


def test_a_long_post_is_cut_before_it_goes_into_the_prompt(causal_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(causal_lm)
    long = " ".join(random_posts(40, seed=6))
    cfg = llm_teacher(causal_lm).model_copy(update={"max_length": 16})
    out = TeacherLabeler([cfg], batch_size=4)(rows([long, "great flight"]))
    assert out.column("truncated").to_pylist() == [True, False]
    cut = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:16])
    expected = direct_log_probs(causal_lm, [PROMPT.format(text=cut)], [f" {w}" for w in LABELS])
    np.testing.assert_allclose(np.array(out.column("teacher_logits").to_pylist()[:1]), expected, atol=1e-4)


def test_calibration_divides_out_the_content_free_prior(causal_lm):
    texts = random_posts(6, seed=8)
    words = [f" {w}" for w in LABELS]
    plain = np.array(TeacherLabeler([llm_teacher(causal_lm)], batch_size=8)(rows(texts))
                     .column("teacher_logits").to_pylist())
    calibrated = np.array(TeacherLabeler([llm_teacher(causal_lm, calibrate=True)], batch_size=8)(rows(texts))
                          .column("teacher_logits").to_pylist())
    free = direct_log_probs(causal_lm, [PROMPT.format(text=t) for t in CALIBRATION["content_free"]], words)
    probs = np.exp(free) / np.exp(free).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(calibrated, plain - np.log(probs.mean(axis=0)), atol=1e-4)


def test_the_metadata_records_the_prompt_the_verbalizer_and_the_label_tokens(causal_lm):
    import hashlib

    info = describe(llm_teacher(causal_lm, verbalizer={"negative": " negative", "neutral": " neutral",
                                                                "positive": " positive"}, calibrate=True))
    meta = info.model_dump(exclude_unset=True)
    assert meta["kind"] == "llm" and meta["prompt"] == PROMPT
    assert meta["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert meta["verbalizer"] == {"negative": [" negative"], "neutral": [" neutral"], "positive": [" positive"]}
    assert len({i for ids in meta["label_token_ids"] for i in ids}) == 3 and meta["calibration"] == CALIBRATION
    assert info.labels == LABELS and info.architecture in ("GPT2LMHeadModel", "LlamaForCausalLM")


def test_a_classifier_teachers_metadata_keeps_its_keys(tiny_teacher):
    meta = describe(TeacherConfig(model=str(tiny_teacher))).model_dump(exclude_unset=True)
    assert set(meta) == {"model", "revision", "weights_sha256", "id2label", "architecture", "name", "task",
                         "max_length"}


def test_a_label_word_of_several_tokens_is_refused_by_name(causal_lm):
    cfg = llm_teacher(causal_lm, verbalizer={"negative": " negative", "neutral": " neutral",
                                             "positive": " positivezzqx"})
    with pytest.raises(ModelError, match="label 'positive''s word ' positivezzqx' is [0-9]+ tokens \\[.*\\] in "):
        describe(cfg)


@pytest.mark.parametrize("prompt, message", [("Sentiment:", "no \\{text\\} placeholder"),
                                             ("{text} is {mood}", "cannot be filled in with the post")])
def test_a_prompt_without_the_post_is_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        TeacherConfig(model="m", kind="llm", prompt=prompt, labels=LABELS)


def test_llm_fields_on_a_classifier_teacher_are_refused():
    with pytest.raises(ValueError, match="only an LLM teacher \\(kind: llm\\) takes prompt, chat"):
        TeacherConfig(model="m", prompt=PROMPT, labels=LABELS, chat=True)


def test_a_classifier_teachers_labels_are_checked_against_its_own(tiny_teacher):
    with pytest.raises(ModelError, match="predicts \\['negative', 'neutral', 'positive'\\], but its labels are set"):
        describe(TeacherConfig(model=str(tiny_teacher), labels=["positive", "neutral", "negative"]))


def test_a_classifier_is_not_an_llm_teacher(tiny_teacher):
    with pytest.raises(ModelError, match="not a causal language model \\(one AutoModelForCausalLM loads\\)"):
        describe(llm_teacher(tiny_teacher))


@pytest.mark.slow
def test_an_llm_and_a_classifier_teacher_label_one_corpus_in_one_pass(tmp_path, ray_session, tiny_teacher):
    import pyarrow.parquet as pq

    from kd_ray.config import LabelConfig, load_config
    from kd_ray.data.soft_labels import read_soft_label_info
    from kd_ray.stages.label import run_label

    lm = build_tiny_causal_lm(tmp_path / "lm", "llama")
    texts = random_posts(300, seed=12)
    (tmp_path / "posts.txt").write_text("\n".join(texts) + "\n")
    cfg = load_config(LabelConfig, overrides={
        "corpus.path": str(tmp_path / "posts.txt"), "output.path": str(tmp_path / "labels"),
        "compute.block_rows": 64,
        "teachers": [{"model": str(tiny_teacher), "name": "encoder"},
                     {"model": str(lm), "name": "llm", "kind": "llm", "prompt": PROMPT, "labels": LABELS,
                      "max_length": 64}]})
    summary = run_label(cfg)
    assert summary.rows == 300
    info = read_soft_label_info(str(tmp_path / "labels"))
    assert [t.kind for t in info.teachers] == ["classifier", "llm"] and info.teachers[1].prompt == PROMPT
    table = pq.read_table(info.files).sort_by("id")
    got = dict(zip(table.column("text").to_pylist(), table.column("llm_logits").to_pylist()))
    sample = texts[:20]
    expected = direct_log_probs(lm, [PROMPT.format(text=t) for t in sample], [f" {w}" for w in LABELS])
    np.testing.assert_allclose(np.array([got[t] for t in sample]), expected, atol=1e-4)
    assert table.schema.field("encoder_logits").type == pa.list_(pa.float32(), 3)


def test_evaluate_scores_an_llm_teacher_against_a_student(tmp_path, causal_lm, tiny_teacher):
    import json

    from kd_ray.config import EvaluateConfig, load_config
    from kd_ray.stages.evaluate import run_evaluate

    texts = random_posts(40, seed=14)
    gold = [LABELS[i % 3] for i in range(40)]
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f'"{t}",{g}\n' for t, g in zip(texts, gold)))
    cfg = load_config(EvaluateConfig, overrides={
        "test": {"path": str(tmp_path / "test.csv")}, "student": str(tiny_teacher), "output": str(tmp_path / "eval"),
        "teacher": {"model": str(causal_lm), "kind": "llm", "prompt": PROMPT, "labels": LABELS},
        "eval": {"max_length": 64, "timing_rows": 20, "timing_repeats": 1, "threads": 1}})
    run_evaluate(cfg)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    teacher = direct_log_probs(causal_lm, [PROMPT.format(text=t) for t in texts], [f" {w}" for w in LABELS])
    expected = np.mean([LABELS[i] == g for i, g in zip(teacher.argmax(axis=1), gold)])
    assert report["teacher"]["accuracy"] == pytest.approx(expected)
    assert report["student"]["rows_per_s"] > 0 and report["teacher"]["params"] > 0


@pytest.mark.parametrize("tree, message", [({"teacher": "a"}, None),
                                           ({"teacher": {"model": "m", "kind": "llm", "prompt": PROMPT,
                                                         "labels": LABELS}}, None),
                                           ({}, "Field required"),
                                           ({"teacher": {"model": "m", "kind": "llm"}}, "needs prompt")])
def test_evaluate_takes_any_teacher_in_one_field(tree, message):
    from kd_ray.config import EvaluateConfig

    base = {"test": {"path": "t.csv"}, "student": "s", "output": "o"}
    if message is None:
        EvaluateConfig(**base, **tree)
    else:
        with pytest.raises(ValueError, match=message):
            EvaluateConfig(**base, **tree)


def test_a_pipeline_with_an_llm_teacher_labels_without_fine_tuning_or_gold():
    from kd_ray.config import PipelineConfig, load_config
    from kd_ray.stages.pipeline import stages as run_stages

    tree = {"output": "runs/llm", "labels": LABELS,
            "data": {"train": {"path": "posts.txt", "label_column": None}, "test": {"path": "test.csv"}},
            "teacher": {"model": "some/llm", "kind": "llm", "prompt": PROMPT, "calibrate": True,
                        "verbalizer": {"negative": [" negative", " bad"], "neutral": " neutral",
                                       "positive": " positive"}},
            "student": {"model": "some/encoder"}}
    stages = {stage.name: stage for stage in run_stages(load_config(PipelineConfig, overrides=tree))}
    assert list(stages) == ["label", "distill", "evaluate", "report"]  # no fine-tuning; no gold for alpha=0
    (teacher,) = stages["label"].cfg.teachers
    assert (teacher.kind, teacher.model, teacher.labels, teacher.calibrate) == ("llm", "some/llm", LABELS, True)
    assert teacher.label_words[0] == [" negative", " bad"]
    assert stages["label"].cfg.corpus.label_column is None
    (scored,) = stages["evaluate"].cfg["teachers"].values()
    assert isinstance(scored, TeacherConfig) and scored.prompt == PROMPT
    with pytest.raises(ValueError, match="an LLM teacher \\(kind: llm\\) is prompted, not fine-tuned"):
        load_config(PipelineConfig, overrides={**tree, "teacher": {"base_model": "b", "kind": "llm", "prompt": PROMPT}})
    with pytest.raises(ValueError, match="teacher is a causal LM, not an encoder; set student.model"):
        load_config(PipelineConfig, overrides={**tree, "student": {"kind": "cut"}})


@pytest.mark.slow
def test_kd_ray_run_distills_an_llm_teacher_without_gold_labels(tmp_path, ray_session, tiny_teacher):
    """The whole `kd-ray run` with a prompted LM at its head: no fine-tuning, train rows without gold, gold only in
    the test split; the student is cut from an encoder. A distillation from those soft labels that would cut the
    LM itself is refused before it trains."""
    import json

    import pyarrow.parquet as pq
    import yaml

    from kd_ray.cli import main as cli_main
    from kd_ray.config import DistillConfig, load_config
    from kd_ray.errors import KdRayUserError
    from kd_ray.stages.plan import distill_plan

    lm = build_tiny_causal_lm(tmp_path / "lm", "llama")
    posts = random_posts(200, seed=21, max_words=12)
    (tmp_path / "train.txt").write_text("\n".join(posts[:160]) + "\n")
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f'"{t}",{LABELS[i % 3]}\n'
                                                                for i, t in enumerate(posts[160:])))
    config = {"output": str(tmp_path / "run"), "labels": LABELS,
              "data": {"train": {"path": str(tmp_path / "train.txt"), "label_column": None},
                       "test": {"path": str(tmp_path / "test.csv")}},
              "teacher": {"model": str(lm), "kind": "llm", "prompt": PROMPT, "max_length": 48},
              "student": {"model": str(tiny_teacher), "num_layers": 1, "ffn_size": None},
              "distill": {"epochs": 1, "batch_size": 16, "max_length": 32, "num_workers": 0},
              "eval": {"max_length": 48, "timing_rows": 20, "timing_repeats": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    run = tmp_path / "run"
    assert not (run / "teacher").exists() and not (run / "student_alpha0").exists()
    table = pq.read_table(sorted((run / "soft_labels").glob("part-*.parquet")))
    assert table.num_rows == 160 and table.column("label").null_count == 160
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["rows"] == 40 and set(metrics["timings_s"]) >= {"label", "distill", "evaluate"}
    assert "finetune" not in metrics["timings_s"]
    teacher = direct_log_probs(lm, [PROMPT.format(text=t) for t in posts[160:]], [f" {w}" for w in LABELS])
    gold = [LABELS[i % 3] for i in range(40)]
    assert metrics["teacher"]["accuracy"] == pytest.approx(np.mean([LABELS[k] == g for k, g in
                                                                    zip(teacher.argmax(axis=1), gold)]))
    assert 0 <= metrics["student"]["agreement"] <= 1
    cut_the_lm = load_config(DistillConfig, overrides={"soft_labels": str(run / "soft_labels"),
                                                       "output": str(tmp_path / "s")})
    with pytest.raises(KdRayUserError, match="teacher 'teacher' .* is a causal LM, not an encoder"):
        distill_plan(cut_the_lm)
