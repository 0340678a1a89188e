"""``cl data``: ``cl data list`` (every scenario with its protocols) and ``cl data check scenario=NAME data.root=PATH``.

``check`` builds the scenario exactly as ``cl train`` does (same builders, same checks), so a copy that passes here
passes there; it prints what was verified per split (counts, file-list hashes, ``ok`` / ``unverified``) and the
resulting stream. A problem is a :class:`~cl.errors.DataError` naming the missing or different file and where to
get the data (exit code 2).
"""

from __future__ import annotations

from cl.cli import command, split_args
from cl.errors import UserError

DATA_USAGE = """usage: cl data list
       cl data check scenario=NAME data.root=PATH [scenario.KEY=VALUE ...]

`cl data check` verifies a local copy (layout, counts, file-list hashes) and says what is missing or different.
The expected layout of every data set is in docs/data.md."""


def _protocol_lines(builder: object) -> list[str]:
    from scenarios.folder import describe_protocols

    return describe_protocols(getattr(builder, "protocols", {}) or {})


def data_list() -> int:
    from cl.registry import SCENARIOS

    for name, builder in SCENARIOS.items():
        cfg = builder.Config()
        split = (f"init {cfg.init_classes} / increment {cfg.increment or cfg.init_classes}" if cfg.init_classes
                 else f"{cfg.n_experiences} experiences" if cfg.n_experiences else "one experience per domain")
        print(f"{name:<22} {builder.description}")
        print(f"{'':<22}   default: {split}, class order {cfg.class_order}")
        for line in _protocol_lines(builder):
            print(f"{'':<22}   protocol {line}")
    return 0


def data_check(args: list[str]) -> int:
    from cl.config import build_config, section
    from cl.registry import SCENARIOS

    config, overrides, _ = split_args(args)
    if config is None and not any(o.split("=", 1)[0] in ("scenario", "scenario.name") for o in overrides):
        raise UserError("cl data check: name the scenario, e.g. `cl data check scenario=split_cifar100 "
                        "data.root=PATH`")
    cfg = build_config(config, overrides)
    builder = SCENARIOS.get(cfg.scenario.name)()
    sc = builder.build(section(cfg, "scenario"), section(cfg, "data"))
    print(f"{cfg.scenario.name}: data.root={cfg.data.root}")
    reports = getattr(builder, "reports", [])
    for rep in reports:
        print(f"  {rep.line()}")
    if not reports:
        print("  (embedded or package data: nothing to verify)")
    sizes = [e.n_classes for e in sc.experiences]
    n_train = sum(len(e.train) for e in sc.experiences)
    n_test = sum(len(e.test) for e in sc.experiences)
    print(f"  stream: {sc.kind}-incremental, {len(sc)} experiences, classes per experience {sizes}, "
          f"{n_train} train / {n_test} test samples, {sc.image_size} px")
    print(f"  class order (first 10): {sc.class_order[:10]}")
    unverified = [r.split for r in reports if r.status == "unverified"]
    if unverified:
        print(f"  unverified (no official hash known; recorded for later checks): {', '.join(unverified)}")
    print("  OK")
    return 0


@command("data")
def cmd_data(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(DATA_USAGE)
        return 0
    if args[0] == "list":
        return data_list()
    if args[0] == "check":
        return data_check(args[1:])
    raise UserError(f"unknown `cl data` command '{args[0]}' (use list or check)")
