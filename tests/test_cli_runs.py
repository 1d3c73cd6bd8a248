"""The command line around a run, where a user meets it: a folder per run (however many start together), the run's
saved config for export, ``--ckpt_path last`` errors, the summary after a fit, one-line parse errors, and predict
writing a folder only when it writes there."""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path

import pytest
import yaml
from subprocess_helpers import ROOT, finish, start, train_cmd

from stn_lightning.cli import main
from stn_lightning.runs import claim_run_folder

DEMO = ROOT / "configs" / "demo.yaml"
COMMON = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
COMMON += ["--trainer.enable_model_summary", "false", "--data.init_args.batch_size", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fit of two steps (shorter than an epoch, so it never validates): its folder and what it printed."""
    root = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(
            ["fit", "--config", str(DEMO), *COMMON, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2"]
        )
    return root / "lightning_logs" / "version_0", out.getvalue()


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "usage:" not in err and "Traceback" not in err, err
    return err


def test_claiming_run_folders_in_a_race_gives_each_its_own(tmp_path: Path) -> None:
    (tmp_path / "version_3").mkdir()  # runs already there: the new ones come after them
    barrier, claimed = threading.Barrier(16), []

    def claim() -> None:
        barrier.wait()
        claimed.append(claim_run_folder(tmp_path))

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == list(range(4, 20))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{n}" for n in range(3, 20))


def test_runs_started_together_in_one_root_get_a_folder_each(tmp_path: Path) -> None:
    # Before: about one start in three shared version_0 (config overwritten, checkpoints last-v1.ckpt).
    args = ["fit", "--config", str(DEMO), *COMMON, "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    procs = [start(train_cmd(*args, "--model.localization.lr_scale", f"0.{i}"), tmp_path) for i in range(1, 4)]
    for proc in procs:
        code, out = finish(proc, timeout=600)
        assert code == 0, out[-3000:]
    folders = sorted((tmp_path / "lightning_logs").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1", "version_2"]
    scales = [yaml.safe_load((f / "config.yaml").read_text())["model"]["localization"]["lr_scale"] for f in folders]
    assert sorted(scales) == [0.1, 0.2, 0.3]
    for folder in folders:
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["last.ckpt"]
        assert (folder / "hparams.yaml").is_file() and list(folder.glob("events.out.tfevents*"))


def test_export_accepts_the_runs_saved_config_and_print_config(
    run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = run
    ckpt = str(folder / "checkpoints" / "last.ckpt")
    main(["export", "--config", str(folder / "config.yaml"), "--ckpt_path", ckpt, "--output", str(tmp_path / "a.pt2")])
    assert (tmp_path / "a.pt2").is_file()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEMO), "--print_config"])
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    main(
        ["export", "--config", str(tmp_path / "printed.yaml"), "--ckpt_path", ckpt, "--output", str(tmp_path / "b.pt2")]
    )
    assert (tmp_path / "b.pt2").is_file()


def test_last_without_a_run_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (["predict"], ["test"], ["export", "--output", str(tmp_path / "model.pt2")]):
        err = _error([*extra, "--ckpt_path", "last", "--trainer.default_root_dir", str(tmp_path)], capsys)
        assert f"no last.ckpt under {tmp_path / 'lightning_logs'}" in err and "last*.ckpt" in err, err
    assert not list(tmp_path.iterdir())


def test_a_fit_shorter_than_an_epoch_says_so_in_its_summary(run: tuple[Path, str]) -> None:
    folder, out = run
    assert f"logs:          {folder}" in out
    assert "before its first validation" in out and "best:          none" in out, out[-2000:]


def test_parse_errors_are_one_line_naming_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("trainer:\n  max_epochs: many\n")
    err = _error(["fit", "--config", str(DEMO), "--config", str(wrong)], capsys)
    assert "trainer.max_epochs" in err and f"(in {wrong}, which gives 'many')" in err and "many" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1\nmodel: {}\n")
    err = _error(["fit", "--config", str(broken)], capsys)
    assert f"{broken}, line 3" in err and "<unicode string>" not in err, err
    err = _error(["fit", "--config", str(DEMO), "--trainer.max_epochs", "many"], capsys)
    assert err.startswith("error: trainer.max_epochs:") and "many" in err, err


def test_predict_makes_a_folder_only_when_it_writes_there(run: tuple[Path, str], tmp_path: Path) -> None:
    folder, _ = run
    root, ckpt = tmp_path / "root", str(folder / "checkpoints" / "last.ckpt")
    args = ["predict", "--ckpt_path", ckpt, *COMMON, "--trainer.default_root_dir", str(root)]
    args += ["--trainer.limit_predict_batches", "1"]
    main([*args, "--predictions.output", str(tmp_path / "rows.csv")])
    assert (tmp_path / "rows.csv").is_file() and not list(root.glob("**/version_*"))
    with pytest.raises(SystemExit):  # a folder without images: the predict fails, and leaves no folder
        main([*args, "--images", str(tmp_path / "none")])
    assert not list(root.glob("**/version_*"))
    main(args)
    assert [p.name for p in root.rglob("predictions.csv")] == ["predictions.csv"]
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
