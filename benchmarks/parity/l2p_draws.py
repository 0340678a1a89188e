"""L2P's draw-to-draw spread on ONE class order: several torch seeds, the same count on both sides.

    python -m benchmarks.parity.l2p_draws --order 0 --seeds 0 1 2 3 4 5 6 7 --threads 1

As for SEMA (:mod:`benchmarks.parity.sema_draws`): the parity seed ``s`` sets both the class order (the setup of
seed ``s``) and the torch seed (the prompt pool's, keys' and head's initial values and the loader shuffles). Here
the class order stays fixed (the setup of ``--order``) and only the torch seed varies: the official runner's
``--seed`` (their ``main`` seeds torch with it) and our ``seed=``. ``official/l2p.py --check-run`` showed that for
one draw the two codes follow the same trajectory (trainable tensors within 4e-7 after each of 380 Adam steps, the
same accuracy matrix), so two runs on the same order differ by their draw; this measures how far apart draws land on
each side, and whether the two sides' draws come from the same distribution (:func:`compare`). Results:
``results/l2p/draws_order<o>/`` (one :class:`~benchmarks.parity.common.RunResult` per side and torch seed; a
sub-folder, so the table ignores it).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from benchmarks.parity.common import RunResult
from benchmarks.parity.official.l2p import ROWS
from benchmarks.parity.sema_draws import print_summary, run_draws


def compare(official: list[float], ours: list[float], n_perm: int = 100_000, seed: int = 0) -> dict[str, float]:
    """Ours minus official on one metric over draws: mean difference, its standard error (Welch), a two-sided
    two-sample permutation p-value (the draws of the two sides are independent: nothing is shared between runs of
    the same torch seed), and the two-sided sign-flip p-value of the seed-paired differences (as for the table's
    rows, where the seed also fixes the class order; here only a second view)."""
    a, b = np.asarray(official, dtype=float), np.asarray(ours, dtype=float)
    diff = float(b.mean() - a.mean())
    se = float(np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)))
    pooled, n_a = np.concatenate([a, b]), len(a)
    rng = np.random.default_rng(seed)
    perm = np.array([rng.permutation(pooled) for _ in range(n_perm)])
    null = perm[:, n_a:].mean(1) - perm[:, :n_a].mean(1)
    p_two_sample = float((np.abs(null) >= abs(diff) - 1e-12).mean())
    d = b[: min(len(a), len(b))] - a[: min(len(a), len(b))]
    if len(d) <= 16:  # exact: all 2^n sign patterns
        flips = np.array(list(itertools.product([1.0, -1.0], repeat=len(d))))
    else:  # 2^n is too many to list: a Monte Carlo sample of sign patterns
        flips = rng.choice([1.0, -1.0], size=(n_perm, len(d)))
    p_sign_flip = float((np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12).mean())
    return {"diff": diff, "se": se, "p_two_sample": p_two_sample, "p_sign_flip": p_sign_flip}


def seen_classes_acc(res: RunResult) -> list[float]:
    """Accuracy after each experience with the argmax over the seen classes (ours; the official runner records it
    as ``acc_argmax_over_seen_classes`` next to their all-class argmax): the like-for-like curve. The last entry
    is the same either way (every class is seen)."""
    return list(res.extra.get("acc_argmax_over_seen_classes", res.acc))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", type=int, default=0, help="class order (the setup of this parity seed)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(8)), help="torch seeds, both sides")
    ap.add_argument("--sides", nargs="+", default=["official", "ours"], choices=["official", "ours"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--python", default=sys.executable, help="interpreter of the official side (L2P needs no "
                    "package beyond this project's)")
    args = ap.parse_args(argv)
    root = run_draws("l2p", ROWS["l2p"], args.order, args.seeds, args.sides, args.threads, args.python)
    results = {side: [RunResult.load(root / f"{side}_seed{s}.json") for s in args.seeds
                      if (root / f"{side}_seed{s}.json").exists()] for side in args.sides}
    print_summary(results)
    if set(results) == {"official", "ours"}:
        seeds = [s for s in args.seeds if all((root / f"{side}_seed{s}.json").exists() for side in results)]
        accs = {side: [seen_classes_acc(RunResult.load(root / f"{side}_seed{s}.json")) for s in seeds]
                for side in results}
        for metric, fn in (("last", lambda a: a[-1]), ("avg_inc", lambda a: float(np.mean(a)))):
            c = compare([fn(a) for a in accs["official"]], [fn(a) for a in accs["ours"]])
            print(f"ours - official, {metric} (argmax over seen classes) over {len(seeds)} seeds: "
                  f"{c['diff']:+.1f} ± {c['se']:.1f} (se), "
                  f"permutation p {c['p_two_sample']:.2f}, sign-flip p {c['p_sign_flip']:.2f}")


if __name__ == "__main__":
    main()
