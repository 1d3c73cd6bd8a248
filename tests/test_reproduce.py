"""benchmarks/reproduce.py's cache: a run is trained again when its config's settings change, not its comments."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce", None)


def _args(config: Path, seed: int = 0) -> list[str]:
    return ["fit", "--config", str(config), "--seed_everything", str(seed)]


def test_cache_key_follows_settings_not_comments(reproduce, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  loc_lr_scale: 0.1\n")
    first = reproduce._key(_args(config))
    config.write_text("# a new header\nmodel:\n  loc_lr_scale: 0.1  # same value\n")
    assert reproduce._key(_args(config)) == first
    config.write_text("model:\n  loc_lr_scale: 1.0\n")
    assert reproduce._key(_args(config)) != first
    assert reproduce._key(_args(config, seed=1)) != reproduce._key(_args(config))


def test_provenance_counts_runs_per_commit(reproduce) -> None:
    a = reproduce.Cell("distorted", "CNN", "R", "rts_mnist.yaml", ())
    b = reproduce.Cell("multi", "CNN", "2 digits", "multi_mnist.yaml", ())
    results = {
        (a, 0): {"commit": "new"},
        (a, 1): {"commit": "new"},
        (b, 0): {"commit": "old"},
        (b, 1): {},
        (b, 2): {"failed": "x"},
    }
    text = reproduce._provenance(results)
    assert "2 at new (distorted 2)" in text
    assert "1 at old (multi 1)" in text
    assert "1 at unrecorded (multi 1)" in text
    assert "1 at no commit (failed) (multi 1)" in text


def test_settings_reach_every_run_and_its_cache_key(reproduce, tmp_path: Path) -> None:
    cells = [c for c in reproduce.cells(reproduce.EPOCHS) if c.column == "RTS"]
    changed = reproduce.with_settings(cells, ["model.localization.boundary_weight=1", "trainer.max_epochs=7"])
    assert len(changed) == len(cells)
    for before, after in zip(cells, changed, strict=True):
        assert after.overrides[: len(before.overrides)] == before.overrides
        assert after.overrides[len(before.overrides) :] == (
            "--model.localization.boundary_weight",
            "1",
            "--trainer.max_epochs",
            "7",
        )
        assert reproduce._epochs(after) == 7  # the later setting wins, as on the command line
        key = reproduce._key(reproduce._run_args(before, 0, tmp_path))
        assert reproduce._key(reproduce._run_args(after, 0, tmp_path)) != key
    assert reproduce.with_settings(cells, []) == cells
    for bad in ("model.localization.boundary_weight", "=1", "--model.localization.boundary_weight=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            reproduce.with_settings(cells, [bad])


def test_a_difference_inside_the_seeds_spread_is_called_so(reproduce) -> None:
    epochs = ("--trainer.max_epochs", "20")
    base = reproduce.Cell("addition", "CNN per channel", "error", "mnist_addition.yaml", epochs)
    st = reproduce.Cell("addition", "2 x ST-CNN per channel", "error", "mnist_addition.yaml", epochs)
    args = argparse.Namespace(commit="abc", jobs=2, trained=6)

    def table(st_errors: list[float]) -> str:
        results = {(base, s): {"test/acc": 1 - e / 100} for s, e in enumerate([80.0, 78.0, 70.0])}
        results |= {(st, s): {"test/acc": 1 - e / 100} for s, e in enumerate(st_errors)}
        text = reproduce.report(results, [base, st], args, 60.0)
        return next(line for line in text.splitlines() if line.startswith("| error: CNN per channel vs"))

    # 76.0 -> 72.7 with one seed far off: a spread of 25 points covers the difference.
    assert "within the seeds' spread" in table([44.0, 87.0, 87.0])
    assert "lower error with the transformer (the difference, 3.33" in table([44.0, 87.0, 87.0])
    # 76.0 -> 20.0 with a spread of 2: a difference the seeds agree on.
    line = table([18.0, 20.0, 22.0])
    assert "lower error with the transformer" in line and "spread" not in line


def test_ordering_counts_the_pairs_the_paper_ranks_apart(reproduce) -> None:
    # Paper R column: FCN 2.1, CNN 1.2, ST-CNN Aff 0.7, ST-FCN Aff 1.2 (tied with the CNN: not a pair).
    rows = ("FCN", "CNN", "ST-FCN Aff", "ST-CNN Aff")
    cells = {
        row: next(c for c in reproduce.cells(reproduce.EPOCHS) if c.row == row and c.column == "R") for row in rows
    }
    ours = {
        "FCN": [20.0, 21.0, 22.0],  # worst, as in the paper
        "CNN": [10.0, 10.5, 11.0],
        "ST-FCN Aff": [5.0, 6.0, 7.0],  # below the ST-CNN, which the paper ranks lower: reversed beyond the spread
        "ST-CNN Aff": [9.0, 10.0, 11.5],  # below the CNN by less than its spread: in the paper's order all the same
    }
    args = argparse.Namespace(commit="abc", jobs=2, trained=12)

    def r_line() -> str:
        results = {(cells[row], s): {"test/acc": 1 - e / 100} for row, errs in ours.items() for s, e in enumerate(errs)}
        text = reproduce.report(results, list(cells.values()), args, 60.0)
        return next(line for line in text.splitlines() if line.startswith("| R | "))

    line = r_line()
    # Pairs with different paper errors: FCN-CNN, FCN-STFCN, FCN-STCNN, CNN-STCNN, STFCN-STCNN (CNN-STFCN tied).
    assert line.startswith("| R | 5 | 4 | 0 | 0 | 1 | ST-FCN Aff 6.00 < ST-CNN Aff 10.17 (paper 1.2 > 0.7) |")

    # The ST-CNN 0.5 points above the CNN with a spread of 1.25: reversed, but within the spread.
    ours["ST-CNN Aff"] = [10.0, 11.0, 12.5]
    ours["ST-FCN Aff"] = [15.0, 16.0, 17.0]
    line = r_line()
    assert line.startswith("| R | 5 | 4 | 1 | 0 | 0 |  |")


def test_the_full_size_plan_trains_both_sources_at_the_same_steps(reproduce) -> None:
    plan = reproduce.full_size_plan("fashion_mnist", [0, 1, 2])
    by_source: dict[str, list] = {"bundled": [], "fashion_mnist": []}
    for cell, seed in plan:
        by_source[cell.source].append((cell, seed))
    assert len(by_source["bundled"]) == len(by_source["fashion_mnist"]) == len(plan) // 2
    for source, runs in by_source.items():
        for cell, _ in runs:
            args = reproduce._run_args(cell, 0, Path("/x"))
            flag = dict(zip(args[:-1], args[1:], strict=True))
            # One epoch is the bundled digits' 27 steps, validated on their 500 digits, on either source.
            assert flag["--trainer.limit_train_batches"] == "27" and flag["--trainer.limit_val_batches"] == "4"
            assert flag["--trainer.max_epochs"] == str(reproduce.FULL_SIZE_EPOCHS[cell.table])
            assert flag.get("--data.init_args.source", "bundled") == source
        seeds = {}
        for cell, seed in runs:
            seeds.setdefault((cell.table, cell.column, cell.row), []).append(seed)
        # The baselines of the robustness table on 5 seeds, every other row of a comparison on the 3 asked for.
        assert seeds[("distorted", "RTS", "FCN")] == seeds[("distorted", "RTS", "CNN")] == [0, 1, 2, 3, 4]
        for table, column, _, st in reproduce.FULL_SIZE_COMPARISONS:
            assert seeds[(table, column, st)] == [0, 1, 2]
    assert len({reproduce._key(reproduce._run_args(c, s, Path("/x"))) for c, s in plan}) == len(plan)


def test_the_full_size_report_compares_reductions_and_counts_dead_runs(reproduce) -> None:
    plan = reproduce.full_size_plan("fashion_mnist", [0, 1, 2])
    # Made-up errors: the ST halves the baseline's error on Fashion-MNIST except at seed 2 of RTS; one FCN seed at
    # chance on Fashion-MNIST.
    results = {}
    for cell, seed in plan:
        error = 20.0 if cell.row in ("CNN", "FCN") else 10.0
        if cell.source == "bundled" and cell.row not in ("CNN", "FCN"):
            error = 15.0
        if cell.source == "fashion_mnist" and cell.column == "RTS" and cell.row == "ST-CNN Aff" and seed == 2:
            error = 25.0
        if cell.source == "fashion_mnist" and cell.row == "FCN" and seed == 4:
            error = 90.0
        results[(cell, seed)] = {"test/acc": 1 - error / 100, "seconds": 1.0, "commit": "abc"}
    args = argparse.Namespace(commit="abc", jobs=2, trained=0)
    text = reproduce.full_size_report(results, "fashion_mnist", args, 1.0)
    rts = next(line for line in text.splitlines() if line.startswith("| RTS: CNN vs ST-CNN Aff"))
    cells = [c.strip() for c in rts.split("|")[1:-1]]
    assert cells[1:6] == ["20.00 ± 0.00 -> 15.00 ± 0.00", "25 %", "20.00 ± 0.00 -> 15.00 ± 8.66", "25 %", "2 of 3"]
    p = next(line for line in text.splitlines() if line.startswith("| P: CNN vs ST-CNN Aff"))
    assert "| 20.00 ± 0.00 -> 10.00 ± 0.00 | 50 % | 3 of 3 |" in p
    fcn = next(line for line in text.splitlines() if line.startswith("| FCN | fashion_mnist"))
    assert fcn.endswith("| 1 of 5 |  |") and "90.0" in fcn


def test_scenes_rows_and_their_metrics_in_the_report(reproduce, tmp_path: Path) -> None:
    cells = [c for c in reproduce.cells(reproduce.EPOCHS) if c.table == "scenes"]
    assert [c.row for c in cells] == ["CNN", "K = 1", "K = 2", "K = 3", "K = 4"]
    assert [c.config for c in cells] == ["scenes_cnn.yaml"] + ["scenes.yaml"] * 4
    # each seed draws its own scenes
    args = reproduce._run_args(cells[3], 4, tmp_path)
    assert args[args.index("--data.init_args.seed") + 1] == "4"
    assert args[args.index("--model.transformer.num_transformers") + 1] == "3"
    results = {}
    for cell in cells:
        k = 0 if cell.row == "CNN" else int(cell.row.split()[2])
        for seed in (0, 1):
            results[(cell, seed)] = {"test/acc": 0.1 * k + 0.01 * seed, "test/count_acc": 0.5 + 0.1 * seed}
            results[(cell, seed)]["test/f1"] = 0.25
            if k:
                results[(cell, seed)]["test/coloc"] = 0.9
    text = reproduce.report(results, cells, argparse.Namespace(commit="abc", jobs=2, trained=10), 60.0)
    # set accuracy, count accuracy, F1, co-localisation
    assert "| K = 3 | 30.50 ± 0.71 | 55.00 ± 7.07 | 0.25 ± 0.00 | 90.00 ± 0.00 |" in text
    assert "| CNN | 0.50 ± 0.71 | 55.00 ± 7.07 | 0.25 ± 0.00 | n/a |" in text
    assert "| 1-3 digits: CNN vs K = 3 | 99.50 -> 69.50, 30 % |" in text  # set errors


def test_sum_rows_with_nothing_only_where_the_sum_head_reaches_every_sum(reproduce) -> None:
    rows = {(c.row, c.column) for c in reproduce.cells(reproduce.EPOCHS) if "nothing" in c.row}
    assert rows == {("K = 2 + nothing", "2 digits"), ("K = 3 + nothing", "2 digits"), ("K = 3 + nothing", "3 digits")}


def test_a_subset_of_the_tables_gets_a_page_of_its_own(reproduce) -> None:
    def page(**given: object) -> str:
        args = dict(quick=False, only=None, columns=None, rows=None, settings=[]) | given
        return reproduce._page(argparse.Namespace(**args))

    assert page() == "RESULTS.md"
    assert page(quick=True) == "RESULTS-quick.md"
    assert page(only=["sequences"], columns=["64 px"]) == "RESULTS-sequences.md"
    assert page(only=["scenes", "multi"]) == "RESULTS-scenes-multi.md"
    assert page(columns=["RTS"]) == page(settings=["a=1"]) == "RESULTS-partial.md"
