"""report.png / report.html: drawn from the run folder's files only, the plotted values equal to the log's,
rebuilt identically, several runs overlaid and labelled by their config differences, and never a
reason for a run to fail."""

from __future__ import annotations

import json
import math
from html import escape

import pytest
import yaml

from minitune import run_report
from minitune.cli import main
from minitune.errors import ReportError
from minitune.run_data import load_run, run_labels, table_rows
from minitune.run_plots import draw
from minitune.run_report import write_report
from tests.conftest import measured_config, tiny_config


def panels(fig) -> dict:
    """{panel gid: {line or bar gid: (x values, y values)}} of a drawn report."""
    out = {}
    for ax in fig.axes:
        series: dict = {}
        for line in ax.get_lines():  # a second run's line of the same series: 'loss#2'
            key = line.get_gid()
            n = 2
            while key in series:
                key, n = f"{line.get_gid()}#{n}", n + 1
            series[key] = (list(line.get_xdata()), [float(v) for v in line.get_ydata()])
        for patch in ax.patches:
            xs, ys = series.setdefault(f"bar:{patch.get_gid()}", ([], []))
            xs.append(patch.get_x())
            ys.append(patch.get_height())
        out[ax.get_gid()] = series
    return out


def logged(folder, key):
    recs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if key in r], [r[key] for r in recs if key in r]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step tiny run with evaluation every step, per-module grad norms and the report on."""
    from minitune.run import train

    out = tmp_path_factory.mktemp("report") / "run"
    train(measured_config("tiny-llama", out, training={"max_steps": 3, "eval_every": 1, "eval_batches": 1},
                      logging={"progress": "none", "module_grad_norms": True, "report": True}))
    return out


def test_a_finished_run_plots_its_log_values(finished_run):
    assert (finished_run / "report.png").stat().st_size > 10_000
    fig = draw([load_run(finished_run)])
    p = panels(fig)
    for panel, key in (("loss", "loss"), ("loss", "eval_loss"), ("learning_rate", "learning_rate"),
                       ("grad_norm", "grad_norm"), ("tokens_per_s", "tokens_per_s"), ("memory", "mem/rss_mb"),
                       ("memory", "mem/peak_rss_mb")):
        steps, values = logged(finished_run, key)
        assert len(steps) == 3, key
        assert p[panel][key] == (steps, values), key
    # one line per adapter module (tiny-llama: q, v of 2 layers, lora_A and lora_B), its logged values
    modules = {k: v for k, v in p["grad_norm"].items() if k.startswith("grad_norm/")}
    assert len(modules) == 8
    assert modules["grad_norm/model.layers.1.self_attn.v_proj.lora_B"] == \
        logged(finished_run, "grad_norm/model.layers.1.self_attn.v_proj.lora_B")
    # the predicted and the measured training peak of memory.json as lines
    memory = json.loads((finished_run / "memory.json").read_text())
    assert p["memory"]["predicted"][1][0] == pytest.approx(memory["predicted"]["total"] / 2**20)
    assert p["memory"]["measured"][1][0] == pytest.approx(memory["training_peak_mb"])
    phases = p["phases"]["bar:phases"][1]
    assert phases == [v["mem/current_mb"] for v in memory["phases"].values()]
    assert list(memory["phases"]) == ["start", "load", "prepare", "lora", "forward", "backward", "optimizer"]


def test_a_report_is_rebuilt_identically_from_the_folder(finished_run, tmp_path, capsys):
    png, html = (finished_run / "report.png").read_bytes(), (finished_run / "report.html").read_text()
    assert main(["report", str(finished_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.png").read_bytes() == png
    assert (tmp_path / "report.html").read_text() == html
    out = capsys.readouterr().out
    assert "final figures" in out and f"report: {tmp_path / 'report.png'}" in out


def test_eval_adds_its_scores_and_generations_to_the_run_report(finished_run):
    from minitune.evaluate import evaluate_checkpoint

    before = (finished_run / "report.png").read_bytes()
    ev = evaluate_checkpoint(finished_run / "final", ["generation.max_new_tokens=4"], num_prompts=2, max_samples=4,
                             sheet=False)
    assert ev.files["report"] == str(finished_run / "report.png")
    assert (finished_run / "report.png").read_bytes() != before
    p = panels(draw([load_run(finished_run)]))
    saved = json.loads((finished_run / "eval" / "final" / "eval.json").read_text())  # eval.py's default --out
    assert p["perplexity"]["bar:base"][1] == [pytest.approx(saved["perplexity"]["base"]["perplexity"])]
    assert p["perplexity"]["bar:fine-tuned"][1] == [pytest.approx(saved["perplexity"]["tuned"]["perplexity"])]
    assert p["task"]["bar:fine-tuned"][1] == [pytest.approx(saved["task"]["tuned"]["tag_f1"])]
    html = (finished_run / "report.html").read_text()
    for gen in saved["generations"]:
        assert f"<td class='gen'>{escape(gen['tuned'])}</td>" in html
    assert html.count("<td class='gen'>") == 4 * len(saved["generations"]) == 8


def _fake_run(folder, r, losses, modules=0):
    """A run folder written by hand: config.yaml with lora.r=`r`, a log of `losses`."""
    folder.mkdir(parents=True)
    cfg = tiny_config("tiny-llama", folder, lora={"r": r})
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for step, loss in enumerate(losses, 1):
        rec = {"step": step, "loss": loss, "grad_norm": 1.0 / step, "learning_rate": 1e-3, "step_time_s": 0.5,
               "tokens": 100 * step, "tokens_per_s": 200.0, "mem/rss_mb": 500.0 + step, "mem/peak_rss_mb": 510.0 + step}
        for i in range(modules):
            rec[f"grad_norm/model.layers.{i}.self_attn.q_proj.lora_B"] = float(i + step)
        lines.append(json.dumps(rec))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_several_runs_are_overlaid_and_labelled_by_their_config_differences(tmp_path):
    a = _fake_run(tmp_path / "runs" / "a", 8, [3.0, 2.5, 2.0])
    b = _fake_run(tmp_path / "runs" / "b", 32, [3.0, 2.0, 1.5, 1.2])
    runs = [load_run(a), load_run(b)]
    labels = run_labels(runs)
    assert labels == ["lora.r=8", "lora.r=32"]  # training.output_dir differs too, but is no difference
    p = panels(draw(runs))
    assert p["loss"] == {"loss": ([1, 2, 3], [3.0, 2.5, 2.0]), "loss#2": ([1, 2, 3, 4], [3.0, 2.0, 1.5, 1.2])}
    assert p["memory"]["mem/peak_rss_mb#2"] == ([1, 2, 3, 4], [511.0, 512.0, 513.0, 514.0])
    assert p["grad_norm"]["grad_norm#2"][1] == [1.0, 0.5, 1 / 3, 0.25]
    rows = table_rows(runs, labels)
    # tokens/s: the last tokens over the logged training time (step_time_s x steps)
    assert [r[0] for r in rows] == labels and [r[5] for r in rows] == ["200", "200"]
    assert [r[2] for r in rows] == ["2.0000", "1.2000"]
    png, html = write_report([a, b])
    assert png == tmp_path / "runs" / "report.png" and "lora.r=32" in html.read_text()


def test_many_adapter_modules_are_grouped_by_name_over_layers(tmp_path):
    run = load_run(_fake_run(tmp_path / "run", 8, [1.0, 0.5], modules=12))
    p = panels(draw([run]))
    grouped = p["grad_norm"]["grad_norm/q_proj.lora_B (all 12 layers)"]
    assert grouped == ([1, 2], [pytest.approx(math.sqrt(sum((i + s) ** 2 for i in range(12)))) for s in (1, 2)])


def test_an_unreadable_log_is_one_error_line(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", 8, [1.0, 0.5])
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": \n')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "line 3 is not a JSON record" in err
    assert not (run / "report.png").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(ReportError, match="holds no log.jsonl"):
        load_run(tmp_path)


def test_a_failure_to_draw_is_one_warning_line_and_never_fails_a_run(tmp_path, monkeypatch, capsys):
    from minitune.run import train

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts\nsecond line")

    monkeypatch.setattr(run_report, "draw", broken)
    result = train(tiny_config("tiny-llama", tmp_path / "run", training={"max_steps": 1},
                               logging={"progress": "none", "report": True}))
    assert result.checkpoint is not None
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "report" in line]
    assert warnings == [f"warning: no report drawn in {tmp_path / 'run'} (RuntimeError: no fonts)"]
    assert not (tmp_path / "run" / "report.png").exists()


def test_a_run_that_fails_after_its_first_step_still_leaves_a_report(tmp_path):
    from minitune.run import train

    def fail_at_step_2(state, metrics):
        if state.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(measured_config("tiny-llama", tmp_path / "run", training={"max_steps": 4},
                              logging={"progress": "none", "report": True}), on_step=fail_at_step_2)
    p = panels(draw([load_run(tmp_path / "run")]))
    assert p["loss"]["loss"] == logged(tmp_path / "run", "loss") and p["loss"]["loss"][0] == [1, 2]
    assert (tmp_path / "run" / "report.png").is_file() and not (tmp_path / "run" / "memory.json").exists()


def test_logging_report_false_draws_nothing(tmp_path):
    from minitune.run import train

    train(tiny_config("tiny-llama", tmp_path / "run", training={"max_steps": 1},
                      logging={"progress": "none", "report": False}))
    assert (tmp_path / "run" / "log.jsonl").is_file() and not (tmp_path / "run" / "report.png").exists()
