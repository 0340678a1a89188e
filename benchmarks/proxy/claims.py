"""The papers' qualitative claims checked against the cached proxy-benchmark runs; writes them into the README.

Reads the same cache as ``run.py`` (the runs of the current configs only) and each run's ``metrics.json``
(``experiences[i].passes_seen_acc`` for SLCA's aligned/unaligned and LAE's online/offline/ensemble predictors,
``experiences[i].extra`` for SEMA's adapters and the FLOPs).

    python benchmarks/proxy/claims.py --seeds 0 1 2
    python benchmarks/proxy/claims.py --merge   # a cache with only some rows: keep the README's other claims
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.proxy import run as bench  # noqa: E402

MARK_START, MARK_END = "<!-- claims:start -->", "<!-- claims:end -->"


def load_runs(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(group, row) -> [result.json + metrics.json] for every cached seed of the current configs."""
    ns = argparse.Namespace(stream=args.stream, quick=False, quick_batches=3)
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in bench.plan(None, list(bench.GROUPS)):
        for seed in args.seeds:
            try:
                cfg = bench.config_for(row, seed, ns)
            except Exception:  # noqa: BLE001
                continue
            folder = args.cache / row.group / row.name.replace(":", "_") / f"seed{seed}-{bench.cache_key(row, cfg)}"
            if not (folder / "result.json").is_file():
                older = bench.latest_cached(args.cache, row, seed)  # preset changed since the run: use it, marked
                if older is None:
                    continue
                folder = older.parent
            res = json.loads((folder / "result.json").read_text())
            metrics = folder / "run" / "metrics.json"
            res["metrics"] = json.loads(metrics.read_text()) if metrics.is_file() else {}
            out.setdefault((row.group, row.name), []).append(res)
    return out


def ms(values: list[float], scale: float = 100.0) -> str:
    vals = [v * scale for v in values]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"


def final_pass(run: dict[str, Any], name: str) -> float | None:
    exps = run["metrics"].get("experiences", [])
    return exps[-1].get("passes_seen_acc", {}).get(name) if exps else None


def n_seeds(runs: list[dict[str, Any]]) -> str:
    return f"{len(runs)} seed{'s' if len(runs) != 1 else ''}"


def claims(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    lines: list[str] = []
    get = runs.get

    def last(key: tuple[str, str]) -> list[float]:
        return [r["last_acc"] for r in get(key, [])]

    # SLCA
    slca, ft = get(("vit", "slca"), []), get(("vit", "finetune"), [])
    if slca and ft:
        a, b = statistics.mean(last(("vit", "slca"))), statistics.mean(last(("vit", "finetune")))
        lines.append(f"* **SLCA above sequential fine-tuning: {'held' if a > b else 'did not hold'}.** Last accuracy "
                     f"{ms(last(('vit', 'slca')))} % vs {ms(last(('vit', 'finetune')))} % for `finetune` on the same "
                     f"pre-trained ViT ({n_seeds(slca)}).")
        al = [final_pass(r, "main") for r in slca]
        un = [final_pass(r, "unaligned") for r in slca]
        if all(v is not None for v in al + un):
            gain = statistics.mean(al) - statistics.mean(un)
            extra = slca[0]["metrics"]["experiences"][-1].get("extra", {})
            lines.append(f"* **SLCA's classifier alignment helps: {'held' if gain > 0 else 'did not hold'}.** Final "
                         f"accuracy with the aligned classifier {ms(al)} % vs {ms(un)} % with the classifier as "
                         f"trained (pass `unaligned`), {100 * gain:+.1f} points; seed {slca[0]['seed']}: old classes "
                         f"{100 * extra.get('acc_old', float('nan')):.1f} vs "
                         f"{100 * extra.get('acc_old_unaligned', float('nan')):.1f} %, new classes "
                         f"{100 * extra.get('acc_new', float('nan')):.1f} vs "
                         f"{100 * extra.get('acc_new_unaligned', float('nan')):.1f} %.")
    else:
        lines.append("* SLCA: not run.")
    # LAE
    lae = get(("vit", "lae"), [])
    if lae and final_pass(lae[0], "online") is not None:
        ens = [final_pass(r, "main") for r in lae]
        on = [final_pass(r, "online") for r in lae]
        off = [final_pass(r, "offline") for r in lae]
        ok = all(e >= min(a, b) - 1e-9 for e, a, b in zip(ens, on, off) if a is not None and b is not None)
        best = all(e >= max(a, b) - 1e-9 for e, a, b in zip(ens, on, off) if a is not None and b is not None)
        lines.append(f"* **LAE's ensemble at least as good as its weaker expert: {'held' if ok else 'did not hold'}"
                     f"** (in every seed). Final accuracy: ensemble {ms(ens)} %, online expert {ms(on)} %, offline "
                     f"expert {ms([v for v in off if v is not None])} %; the ensemble is "
                     f"{'also' if best else 'not'} at least as good as the better expert"
                     f"{'' if best else ' in every seed'} ({n_seeds(lae)}).")
    else:
        lines.append("* LAE: not run.")
    # SEMA
    sema = get(("vit", "sema"), [])
    if sema:
        r = sema[0]
        exps = r["metrics"].get("experiences", [])
        per = [e.get("extra", {}).get("sema/adapters_per_block") for e in exps]
        expanded = [e.get("extra", {}).get("sema/expanded_blocks") for e in exps]
        shifted = len(exps) - 1
        grew = [i for i in range(1, len(per)) if per[i] is not None and per[i - 1] is not None and per[i] != per[i - 1]]
        only_shift = grew == [shifted] or grew == []
        total = [sum(p) if p else 0 for p in per]
        lines.append(f"* **SEMA adds adapters only on shift: {'held' if grew == [shifted] else 'did not hold'}"
                     f"** (seed {r['seed']}). Adapters per expandable block after each experience: {per}; "
                     f"expanded blocks per experience: {expanded}; the shifted experience is experience {shifted} "
                     f"(inverted digits). Experiences after the first that added adapters: {grew or 'none'}"
                     f"{'' if only_shift else ' (some are in-distribution Fashion-MNIST experiences)'}.")
        sub = bool(total) and total[-1] < len(total) * total[0]
        lines.append(f"* **SEMA grows sub-linearly: {'held' if sub else 'did not hold'}.** Total adapters "
                     f"{total[-1] if total else 'n/a'} after {len(total)} experiences, against "
                     f"{len(total) * (total[0] if total else 0)} for one new adapter set per experience; added "
                     f"parameters {r.get('added_params')} (all seeds: "
                     f"{sorted({x.get('added_params') for x in sema})}).")
    else:
        lines.append("* SEMA: not run.")
    # RanPAC and APER against SimpleCIL (ncm) on the same pre-trained ViT
    ncm = last(("vit", "ncm"))
    for name, label, strict in (("ranpac", "RanPAC", True), ("aper", "APER", False)):
        mine = last(("vit", name))
        if mine and ncm:
            a, b = statistics.mean(mine), statistics.mean(ncm)
            ok = a > b if strict else a >= b
            line = (f"* **{label} {'above' if strict else 'at least as good as'} SimpleCIL (`ncm`): "
                    f"{'held' if ok else 'did not hold'}.** Last accuracy {ms(mine)} % vs {ms(ncm)} % for `ncm` on "
                    f"the same pre-trained ViT ({100 * (a - b):+.1f} points, {n_seeds(get(('vit', name), []))}).")
            if name == "aper":
                pre = [final_pass(r, "pretrained") for r in get(("vit", name), [])]
                ada = [final_pass(r, "adapted") for r in get(("vit", name), [])]
                if all(v is not None for v in pre + ada):
                    line += (f" Its halves alone: pre-trained features {ms(pre)} % (SimpleCIL inside the same run), "
                             f"adapted features {ms(ada)} %.")
            lines.append(line)
        else:
            lines.append(f"* {label} vs `ncm`: not run.")
    # L2P and DualPrompt: rehearsal-free prompting above fine-tuning; DualPrompt above L2P (both papers' tables)
    ftl = last(("vit", "finetune"))
    for name, label in (("l2p", "L2P"), ("dualprompt", "DualPrompt"), ("coda_prompt", "CODA-Prompt")):
        mine = last(("vit", name))
        if mine and ftl:
            a, b = statistics.mean(mine), statistics.mean(ftl)
            lines.append(f"* **{label} above sequential fine-tuning: {'held' if a > b else 'did not hold'}.** Last "
                         f"accuracy {ms(mine)} % vs {ms(ftl)} % for `finetune` on the same pre-trained ViT "
                         f"({n_seeds(get(('vit', name), []))}).")
        else:
            lines.append(f"* {label} vs `finetune`: not run.")
    l2p, dp = last(("vit", "l2p")), last(("vit", "dualprompt"))
    if l2p and dp:
        gap = 100 * (statistics.mean(dp) - statistics.mean(l2p))
        lines.append(f"* **DualPrompt above L2P: {'held' if gap > 0 else 'did not hold'}.** Last accuracy {ms(dp)} % "
                     f"vs {ms(l2p)} % ({gap:+.1f} points).")
    # CODA-Prompt above DualPrompt and L2P (CODA-Prompt paper, Tables 1-2)
    coda = last(("vit", "coda_prompt"))
    for other, label in ((dp, "DualPrompt"), (l2p, "L2P")):
        if coda and other:
            gap = 100 * (statistics.mean(coda) - statistics.mean(other))
            lines.append(f"* **CODA-Prompt above {label}: {'held' if gap > 0 else 'did not hold'}.** Last accuracy "
                         f"{ms(coda)} % vs {ms(other)} % ({gap:+.1f} points).")
    # k-FPF vs ER
    kf, er = get(("scratch", "kfpf"), []), get(("scratch", "er"), [])
    if kf and er:
        fk = [r["flops"] for r in kf if r.get("flops")]
        fe = [r["flops"] for r in er if r.get("flops")]
        gap = 100 * (statistics.mean(last(("scratch", "kfpf"))) - statistics.mean(last(("scratch", "er"))))
        ratio = statistics.mean(fk) / statistics.mean(fe) if fk and fe else float("nan")
        lines.append(f"* **k-FPF close to replay at a fraction of its FLOPs: "
                     f"{'held' if gap > -3.0 and ratio < 1.0 else 'did not hold'}** (close = within 3 points). "
                     f"Last accuracy k-FPF {ms(last(('scratch', 'kfpf')))} % vs ER {ms(last(('scratch', 'er')))} % "
                     f"({gap:+.1f} points); training FLOPs {statistics.mean(fk) / 1e9 if fk else float('nan'):.0f} vs "
                     f"{statistics.mean(fe) / 1e9 if fe else float('nan'):.0f} GFLOPs (ratio {ratio:.2f}); both from "
                     f"the presets that ran (each run's config.yaml in the cache).")
        long = get(("scratch", "kfpf[fpf.iters=100]"), [])
        fl = [r["flops"] for r in long if r.get("flops")]
        if long and fl and fe:
            lines[-1] += (f" With FPF calls of 100 iterations instead of 30: "
                          f"{ms(last(('scratch', 'kfpf[fpf.iters=100]')))} % at a FLOPs ratio of "
                          f"{statistics.mean(fl) / statistics.mean(fe):.2f}.")
    else:
        lines.append("* k-FPF vs ER: not run.")
    # FPF on top of another strategy
    for base, label in (("er", "ER"), ("derpp", "DER++")):
        plain, fpf = get(("scratch", base), []), get(("scratch", f"{base}[+fpf]"), [])
        if plain and fpf:
            a, b = statistics.mean(last(("scratch", f"{base}[+fpf]"))), statistics.mean(last(("scratch", base)))
            fa = [r["flops"] for r in fpf if r.get("flops")]
            fb = [r["flops"] for r in plain if r.get("flops")]
            extra = statistics.mean(fa) / statistics.mean(fb) - 1 if fa and fb else float("nan")
            sds = [statistics.stdev(v) for v in (last(("scratch", base)), last(("scratch", f"{base}[+fpf]")))
                   if len(v) > 1]
            noise = ", within the seed spread" if sds and abs(a - b) < max(sds) else ""
            inc = [statistics.mean(r["avg_inc_acc"] for r in x) for x in (fpf, plain)]
            lines.append(f"* **FPF on top of {label} improves it: {'held' if a > b else 'did not hold'}.** Last "
                         f"accuracy {ms(last(('scratch', f'{base}[+fpf]')))} % with FPF after every experience vs "
                         f"{ms(last(('scratch', base)))} % without ({100 * (a - b):+.1f} points{noise}); average "
                         f"incremental accuracy {100 * inc[0]:.1f} vs {100 * inc[1]:.1f} %; {100 * extra:+.0f} % "
                         f"training FLOPs ({n_seeds(fpf)}).")
    # PRD
    prd, prd0 = get(("scratch", "prd"), []), get(("scratch", "prd[lambda_d=0]"), [])
    if prd and prd0:
        def old_acc(r: dict[str, Any]) -> float:
            m = r["metrics"]
            row, tot = m["correct"][-1], m["total"][-1]
            return sum(row[:-1]) / max(1, sum(tot[:-1]))

        def til(r: dict[str, Any]) -> float:
            return r["metrics"].get("til_last_acc") or float("nan")

        a, b = [old_acc(r) for r in prd], [old_acc(r) for r in prd0]
        fa, fb = [r["forgetting"] for r in prd], [r["forgetting"] for r in prd0]
        kept = statistics.mean(a) > statistics.mean(b)
        lines.append(f"* **PRD's distillation keeps old classes: {'held' if kept else 'did not hold'}.** Accuracy on "
                     f"the old experiences after the last one {ms(a)} % with distillation (lambda_d 4) vs {ms(b)} % "
                     f"without (lambda_d 0); forgetting {ms(fa)} vs {ms(fb)} %; task-incremental last accuracy "
                     f"{ms([til(r) for r in prd])} vs {ms([til(r) for r in prd0])} % ({n_seeds(prd)}).")
    else:
        lines.append("* PRD: not run.")
    return lines


def subject(line: str) -> str:
    """The strategy a claim line is about: its first word (``* **SLCA's ...`` and ``* SLCA: not run.``: SLCA)."""
    return line.removeprefix("* ").lstrip("*").split()[0].rstrip(":").removesuffix("'s")


def key(line: str) -> str | None:
    """A checked claim's statement (``* **<statement>: held ...``); None for a ``not run`` line."""
    m = re.match(r"\* \*\*(.+?): (?:held|did not hold)", line)
    return m.group(1) if m else None


def merge_claims(old: list[str], new: list[str]) -> list[str]:
    """``new``'s checked claims (replacing ``old``'s line of the same statement); where ``new`` says a strategy was
    not run, ``old``'s lines about it; ``old``'s other lines after the line they followed."""
    checked = {key(ln): ln for ln in new if key(ln)}
    done = {subject(ln) for ln in checked.values()}
    keep = [ln for ln in old if key(ln) not in checked and (key(ln) or subject(ln) not in done)]
    out: list[str] = []
    for ln in new:
        out += [ln] if key(ln) else [o for o in keep if subject(o) == subject(ln) and o not in out]
    pos = 0
    for o in old:
        rep = o if o in keep else checked.get(key(o))
        if rep is None:  # an old "not run" line of a strategy checked now
            continue
        if rep in out:
            pos = out.index(rep) + 1
        else:
            out.insert(pos, rep)
            pos += 1
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--stream", default="proxy", choices=list(bench.STREAMS))
    p.add_argument("--cache", type=Path, default=bench.CACHE)
    p.add_argument("--readme", type=Path, default=bench.README)
    p.add_argument("--print", action="store_true", help="print instead of writing the README")
    p.add_argument("--merge", action="store_true",
                   help="keep the README's claims about strategies not in this cache (instead of 'not run' lines)")
    args = p.parse_args(argv)
    lines = claims(load_runs(args))
    cmd = ("python benchmarks/proxy/claims.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    text = args.readme.read_text()
    has_block = MARK_START in text and MARK_END in text
    head = [f"Made by `{cmd}` from the cached runs of the table above."]
    if args.merge and has_block:
        old = text.split(MARK_START, 1)[1].split(MARK_END, 1)[0].split("\n")
        merged = merge_claims([ln for ln in old if ln.startswith("* ")], lines)
        for ln in lines:
            if not key(ln):
                print(f"{ln.removeprefix('* ')} (here; the README's lines about {subject(ln)}, if any, are kept)",
                      file=sys.stderr)
        note = f"Updated by `{cmd}`: the claims whose runs are in its cache; the others as made above."
        head = [ln for ln in old if ln and not ln.startswith("* ") and ln != note] + [note]
        lines = merged
    elif not args.print and any(not key(ln) for ln in lines):
        print("warning: claims whose runs are not in this cache are written as 'not run'; --merge keeps the "
              "README's lines for them", file=sys.stderr)
    block = "\n".join([MARK_START, "", *(x for h in head for x in (h, "")), *lines, "", MARK_END])
    if args.print:
        print(block)
        return
    if has_block:
        head_text, rest = text.split(MARK_START, 1)
        text = head_text + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    args.readme.write_text(text)


if __name__ == "__main__":
    main()
