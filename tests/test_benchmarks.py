"""The proxy benchmark end to end in its reduced form (one seed, 3 batches per epoch, a 2-experience digits stream):
two ``cl`` strategies on a from-scratch ResNet, ``ncm`` on the pre-trained ViT and Avalanche's ``Naive``; the table
has the promised columns, the plot is written, and a second call is served from the cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.proxy import run as bench


@pytest.fixture
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # a narrower ResNet than the real table's, so the test stays in budget
    scratch = dict(bench.GROUPS["scratch"], backbone=["backbone=resnet18_cifar", "backbone.nf=4"])
    monkeypatch.setattr(bench, "GROUPS", dict(bench.GROUPS, scratch=scratch))


@pytest.mark.slow
def test_proxy_benchmark_quick_end_to_end(tmp_path: Path, small_groups: None) -> None:
    readme, png, cache = tmp_path / "README.md", tmp_path / "plot.png", tmp_path / "cache"
    readme.write_text("# Benchmarks\n\nintro\n")
    argv = ["--quick", "--stream", "tiny", "--only", "finetune", "er", "ncm", "avalanche:naive",
            "--cache", str(cache), "--readme", str(readme), "--plot", str(png)]
    table = bench.main(argv)

    rows = {(e["group"], e["strategy"]): e for e in table}
    assert set(rows) == {("vit", "finetune"), ("vit", "ncm"), ("scratch", "finetune"), ("scratch", "er"),
                         ("scratch", "avalanche:naive")}
    for e in table:
        assert len(e["runs"]) == 1, (e["strategy"], e["failed"])  # quick = one seed, and nothing failed
        run = e["runs"][0]
        assert 0.0 <= run["last_acc"] <= 1.0 and len(run["accuracy_matrix"]) == 2
        assert not run["cached"]
    # ncm trains nothing; finetune trains every backbone parameter plus its heads
    assert rows[("vit", "ncm")]["runs"][0]["trainable_params"] == 0
    ft = rows[("scratch", "finetune")]["runs"][0]
    assert ft["trainable_params"] > 0 and ft["added_params"] > 0
    assert rows[("scratch", "avalanche:naive")]["runs"][0]["added_params"] == 0
    # quick mode really limited the training batches (recorded in the run's resolved config)
    cfgs = list(cache.glob("scratch/finetune/*/run/config.yaml"))
    assert len(cfgs) == 1 and "limit_train_batches: 3" in cfgs[0].read_text()

    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    header = "| " + " | ".join(bench.COLUMNS[1:]) + " |"
    assert text.count(header) == 2  # one table per backbone group
    for name in ("finetune", "er", "ncm", "avalanche:naive"):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(bench.COLUMNS) - 1
        assert re.fullmatch(r"\d+\.\d", cells[1]), line  # last acc %, one seed: no ± part
    assert "QUICK mode" in text and "python benchmarks/proxy/run.py --quick" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the second call reruns nothing and rewrites the table in place
    again = bench.main(argv)
    assert all(r["cached"] for e in again for r in e["runs"])
    assert [r["last_acc"] for e in again for r in e["runs"]] == [r["last_acc"] for e in table for r in e["runs"]]
    assert readme.read_text().count(bench.MARK_START) == 1


def test_plan_groups_every_registered_strategy() -> None:
    from cl.registry import STRATEGIES

    rows = bench.plan(None, list(bench.GROUPS))
    cl_rows = {r.strategy for r in rows if r.engine == "cl"}
    assert cl_rows == set(STRATEGIES.names())
    for r in rows:
        if r.strategy in bench.PRETRAINED:
            assert r.group == "vit"
    assert {r.name for r in rows if r.engine == "avalanche"} == {"avalanche:naive", "avalanche:ewc", "avalanche:lwf"}
    assert {r.group for r in rows if r.name == "joint"} == {"vit", "scratch"}


def test_merge_table_replaces_and_inserts_rows_and_keeps_the_rest() -> None:
    head = "| " + " | ".join(bench.COLUMNS[1:]) + " |"
    sep = "|" + "---|" * (len(bench.COLUMNS) - 1)

    def row(name: str, acc: str) -> str:
        return f"| {name} | {acc} | " + " | ".join(["x"] * (len(bench.COLUMNS) - 3)) + " |"

    vit, scratch = (bench.group_head(g)[0] for g in ("vit", "scratch"))
    old = "\n".join([bench.MARK_START, "", "Made by `old command`.", "",
                     vit, "", head, sep, row("aper", "1.0"), row("finetune", "2.0"), row("lae", "3.0"), "",
                     scratch, "", head, sep, row("er", "4.0"), row("avalanche:naive", "5.0"), "",
                     "![proxy benchmark](proxy/proxy_fmnist.png)", "", bench.MARK_END])
    order = {"vit": ["aper", "coda_prompt", "finetune", "l2p", "lae"], "scratch": ["er", "avalanche:naive"]}
    new = {"vit": [row("l2p", "9.0"), row("finetune", "8.0"), row("coda_prompt †", "7.0")]}
    merged = bench.merge_table(old, new, order, "Rows merged by `new command`.").split("\n")

    table = [ln for ln in merged if ln.startswith("| ") and ln != head]
    assert table == [row("aper", "1.0"), row("coda_prompt †", "7.0"), row("finetune", "8.0"), row("l2p", "9.0"),
                     row("lae", "3.0"), row("er", "4.0"), row("avalanche:naive", "5.0")]
    # every line of the old block but the replaced row is still there, in its order, and only the new rows, the
    # note and the footnote (each with its blank line) came in
    kept = iter(merged)
    assert all(ln in kept for ln in old.split("\n") if ln != row("finetune", "2.0"))
    assert len(merged) == len(old.split("\n")) - 1 + 3 + 2 + 2
    assert merged.index("Rows merged by `new command`.") < merged.index(vit)
    assert bench.STALE_NOTE in merged  # a † row brings its footnote
    assert merged.index(bench.STALE_NOTE) < merged.index("![proxy benchmark](proxy/proxy_fmnist.png)")
    # a row of a group the table lacks gets that group's section, in the groups' order
    only_scratch = "\n".join([bench.MARK_START, "", "Made by `x`.", "", scratch, "", head, sep, row("er", "4.0"), "",
                              "![proxy benchmark](p.png)", "", bench.MARK_END])
    merged = bench.merge_table(only_scratch, {"vit": [row("lae", "6.0")]}, order, "note").split("\n")
    assert merged.index(vit) < merged.index(row("lae", "6.0")) < merged.index(scratch)
    # merging the same rows again, with another command: the earlier note is replaced, not kept beside the new one
    again = bench.merge_table("\n".join(merged), {"vit": [row("lae", "6.5")]}, order,
                              "Rows `vit/lae` replaced by `other command`.")
    merged = bench.merge_table(again, {"vit": [row("lae", "7.0")]}, order, "Rows `vit/lae` replaced by `a third`.")
    assert "Rows `vit/lae` replaced by `other command`." not in merged.split("\n")
    assert merged.split("\n").count("Rows `vit/lae` replaced by `a third`.") == 1


def test_merge_claims_keeps_the_claims_of_rows_not_in_the_cache() -> None:
    from benchmarks.proxy import claims

    slca, align = "* **SLCA above sequential fine-tuning: held.** x", "* **SLCA's classifier alignment helps: held.** x"
    lae_old, lae_new = "* **LAE's ensemble at least as good: held** 1", "* **LAE's ensemble at least as good: held** 2"
    kfpf, fpf, prd = ("* **k-FPF close to replay: did not hold** x", "* **FPF on top of ER improves it: held.** x",
                      "* **PRD's distillation keeps old classes: held.** x")
    ranpac, dp = "* **RanPAC above SimpleCIL (`ncm`): held.** x", "* **DualPrompt above L2P: held.** x"
    old = [slca, align, lae_old, "* RanPAC vs `ncm`: not run.", kfpf, fpf, prd]
    new = ["* SLCA: not run.", lae_new, ranpac, "* L2P vs `finetune`: not run.", dp, "* k-FPF vs ER: not run.",
           "* PRD: not run."]
    assert claims.merge_claims(old, new) == [slca, align, lae_new, ranpac, dp, kfpf, fpf, prd]
    assert claims.merge_claims([], new) == [lae_new, ranpac, dp]


@pytest.mark.slow
def test_kfpf_cpu_benchmark_quick_writes_its_table_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import kfpf_cpu

    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{kfpf_cpu.MARK_START}\nold\n{kfpf_cpu.MARK_END}\nafter\n")
    argv = ["--quick", "--only", "er", "k-FPF-CE", "--cache", str(tmp_path / "cache"), "--write", "--docs", str(doc)]
    results = {r["label"]: r for r in kfpf_cpu.main(argv)}
    assert set(results) == {"er", "k-FPF-CE"}
    er, kf = results["er"], results["k-FPF-CE"]
    assert er["flops"] > 0 and kf["flops"] > 0  # measured by the FLOPs callback (quick runs: FPF calls dominate)
    assert len(kf["seen"]) == 5 and all(0.0 <= a <= 1.0 for a in kf["seen"])
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| k-FPF-CE | `config=configs/kfpf/cpu.yaml` |" in text and "| er |" in text and "1.00x" in text

    def no_run(*a, **k):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(kfpf_cpu.subprocess, "run", no_run)
    again = kfpf_cpu.main(argv[:-3])  # the same runs, served from the cache
    assert [r["last"] for r in again] == [results[r["label"]]["last"] for r in again]
    with pytest.raises(SystemExit, match="unknown row"):
        kfpf_cpu.main(["--only", "nope"])


def test_data_loading_benchmark_runs_both_loaders(capsys):
    from benchmarks import data_loading

    data_loading.main(["--images", "12", "--workers", "0", "--batch", "4", "--epochs", "1", "--repeats", "1",
                       "--print"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| 0 |")][0]
    plain, ours = (float(v) for v in row.split("|")[2:4])
    assert plain > 0 and ours > 0 and "cl / plain" in out
