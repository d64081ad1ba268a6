"""``python -m xllm.cache``: list, verify and remove the models cached under $XLLM_HOME.

    python -m xllm.cache list
    python -m xllm.cache verify [NAME]
    python -m xllm.cache remove NAME | --all

``list`` prints each cached model's name, state, size and path. The state is "verified" (the
file is the one recorded after its hash was checked), "changed" (it was changed since, or never
checked: the next use hashes it, or run verify), "missing" (only partial downloads or a marker)
or "unregistered" (a folder this version does not know). ``verify`` hashes the cached files
(one model, or all) and exits with 1 if any is not the model. ``remove`` deletes a model's
folder, partial downloads included. Errors are one line on stderr, exit code 2."""
import argparse
import sys
from pathlib import Path

from . import hub
from .errors import XLLMError
from .generate import HelpFormatter


def _parser():
    p = argparse.ArgumentParser(prog="python -m xllm.cache", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--home", type=Path, default=None,
                   help="the cache folder (default: $XLLM_HOME, else ~/.cache/xllm)")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("list", help="the cached models: name, state, size, path",
                        formatter_class=HelpFormatter)
    verify = commands.add_parser("verify", help="hash cached models in full (exit 1 if damaged)",
                                 formatter_class=HelpFormatter)
    verify.add_argument("name", nargs="?", help="one model (default: every cached model)")
    remove = commands.add_parser("remove", help="delete cached models and partial downloads",
                                 formatter_class=HelpFormatter)
    which = remove.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="the model to remove")
    which.add_argument("--all", action="store_true", help="every cached model")
    return p


VERDICTS = {True: "ok", False: "DAMAGED (sha256 differs; its next use fetches it again)",
            None: "not cached"}


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def _list(home):
    models = hub.cached(home)
    if not models:
        print(f"no cached models in {hub.models_dir(home)}")
        return 0
    width = max(len(m.name) for m in models)
    for m in models:
        partial = f" (partial downloads {_mb(m.partial)})" if m.partial else ""
        print(f"{m.name:{width}s}  {m.state:12s} {_mb(m.size):>10s}  {m.path}{partial}")
    return 0


def _verify(home, name):
    names = [name] if name else [m.name for m in hub.cached(home) if m.name in hub.REGISTRY]
    if not names:
        print(f"no cached models in {hub.models_dir(home)}")
        return 0
    results = {n: hub.verify(n, home=home) for n in names}
    for n, ok in results.items():
        print(f"{n}: {VERDICTS[ok]}")
    return 0 if all(results.values()) else 1


def _remove(home, name, everything):
    names = [m.name for m in hub.cached(home)] if everything else [name]
    for n in names:
        print(f"removed {n} ({_mb(hub.remove(n, home=home))})")
    return 0


def main(argv=None):
    """Entry point of ``python -m xllm.cache``; the exit status."""
    a = _parser().parse_args(argv)
    try:
        if a.command == "list":
            return _list(a.home)
        if a.command == "verify":
            return _verify(a.home, a.name)
        return _remove(a.home, a.name, a.all)
    except (XLLMError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
