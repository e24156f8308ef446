"""`kd-ray report` on tuning folders whose searched names hold dots and whose values are not numbers."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from kd_ray.stages.report import write_report


def _tune_folder(folder, space: dict[str, list]) -> None:
    """trials.csv, trial_epochs.csv and tune_summary.json as `kd-ray tune` writes them, for 3 trials."""
    metric = "val_macro_recall"
    trials, epochs = [], []
    for i in range(3):
        values = {name: options[i] for name, options in space.items()}
        stopped = i == 2
        scores = [0.5 + 0.1 * i, 0.55 + 0.1 * i][: 1 if stopped else 2]
        trials.append({"trial": f"trial_0000{i}", **values, "status": "stopped early" if stopped else "completed",
                       "epochs": len(scores), metric: scores[-1],
                       **{f"{metric}_epoch{e + 1}": s for e, s in enumerate(scores)}, "starts": 1, "error": None})
        epochs += [{"trial": f"trial_0000{i}", **values, "epoch": e + 1, metric: s} for e, s in enumerate(scores)]
    folder.mkdir()
    pd.DataFrame(trials).to_csv(folder / "trials.csv", index=False)
    pd.DataFrame(epochs).to_csv(folder / "trial_epochs.csv", index=False)
    (folder / "tune_summary.json").write_text(json.dumps({
        "metric": metric, "best_trial": "trial_00001", "best_value": 0.75,
        "best_values": {name: options[1] for name, options in space.items()}, "default_trial": "trial_00000",
        "default_value": 0.55, "default_status": "completed", "trials": 3, "stopped_early": 1, "errors": 0}))


@pytest.mark.parametrize("space, landscape", [
    ({"loss.kind": ["kl", "mse", "hard"], "train.weight_decay": [0.0, 0.01, 0.1]}, True),
    ({"loss.kind": ["kl", "mse", "hard"]}, False),
])
def test_report_of_searches_over_dotted_and_non_numeric_parameters(tmp_path, space, landscape):
    _tune_folder(tmp_path / "tune", space)
    page = write_report(tmp_path / "tune").read_text()
    pngs = {p.name for p in (tmp_path / "tune" / "report").glob("*.png")}
    assert ("tuning_landscape.png" in pngs) == landscape
    assert "trial_curves.png" in pngs
    assert ("No landscape: none of the searched parameters is a number." in page) != landscape
    assert "loss.kind = mse" in page and "Best of 3 trials" in page


def test_the_landscape_is_titled_by_the_epoch_whose_score_trials_csv_holds(tmp_path):
    """trials.csv holds each trial's kept epoch's score (train.keep), not its last epoch's: the plot says so."""
    from kd_ray.stages.report import plot_landscape

    _tune_folder(tmp_path / "tune", {"temperature": [1.0, 2.0, 4.0], "alpha": [0.1, 0.5, 0.9]})
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    summary = json.loads((tmp_path / "tune" / "tune_summary.json").read_text())
    title = plot_landscape(trials, summary, "temperature", "alpha").axes[0].get_title()
    assert "kept epoch" in title and "last epoch" not in title
