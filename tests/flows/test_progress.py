"""Progress: the library loops call ``on_progress(done, total)`` once per batch, sample or step; the flows side
turns it into a rich bar and, inside a Prefect run, a progress artifact."""

import io

from rich.console import Console

from flows.progress import ProgressCallback, stage_progress
from tests.conftest import collate
from tests.tlora.test_train import _examples, _tlora
from tlora.covariance import collect_covariance
from tlora.sensitivity import score_sensitivity
from tlora.targets import find_targets
from tlora.train import train


def test_covariance_reports_each_batch(tiny_model, samples):
    model = tiny_model("llama")
    calls = []
    collect_covariance(model, collate(samples(7), 3), find_targets(model, "all-linear"), progress=False,
                       on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_sensitivity_reports_each_sample_or_batch(tiny_model, samples):
    model = tiny_model("llama")
    for mode, expected in (("per_sample", [(i, 5) for i in range(1, 6)]), ("batched", [(2, 5), (4, 5), (5, 5)])):
        calls = []
        score_sensitivity(model, collate(samples(5), 2), "all-linear", mode=mode, progress=False,
                          on_progress=lambda done, total, calls=calls: calls.append((done, total)))
        assert calls == expected, mode


def test_training_reports_each_optimizer_step(tiny_model, tiny_tokenizer, samples, tmp_path):
    calls = []
    train(_tlora(tiny_model), tiny_tokenizer, _examples(samples, n=8), output_dir=tmp_path, max_steps=3,
          learning_rate=1e-3, batch_size=4, progress=False,
          callbacks=[ProgressCallback(lambda done, total: calls.append((done, total)))])
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_stage_progress_outside_a_run_draws_the_bar_only(monkeypatch):
    created = []
    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", lambda **kw: created.append(kw))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with stage_progress("covariance", "covariance", terminal=True, console=console) as on_progress:
        for i in range(1, 5):
            on_progress(i, 4)
    assert created == []  # no flow or task run: nothing to attach an artifact to
    assert "covariance" in out.getvalue() and "4/4" in out.getvalue()
