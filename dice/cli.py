"""The command line of every stage and tool: fire parses it, after the flags are checked here.

One declaration per flag: `main`'s signature gives its name, type and default (int, float, bool, str, Literal[...] for
a choice, list[int] for a comma-separated list, `A | B` for either), and its line in `main`'s `Args:` docstring gives
the help text and, in a trailing "(>= 1)" or "(> 0, <= 1)", its range. `run(main)` checks the command line against
the signature before `main` runs: an unknown or misspelt flag, a missing required one or a stray argument is one line
with a did-you-mean and exit status 2, with nothing read or written; `--help` prints the flags and exits 0.
`flags(main, locals())`, the first line of every `main`, converts and checks the values (fire ignores type hints), so a
call from Python is checked the same way as the command line.
"""
import contextlib
import difflib
import importlib.util
import inspect
import os
import re
import sys
import types
import typing
from types import SimpleNamespace

from dice import DiceError


def run(main, extra_flags=None):
    """The entry point of a script: check the flags, then let fire call `main`. A DiceError is `error: <message>` on
    stderr and exit status 2; "done already" (protocol.AlreadyDone) is printed once and exits 0. `extra_flags`: for a
    `main(**options)`, a function returning the other names it accepts (called only when such a flag is given)."""
    from dice.protocol import AlreadyDone

    argv, name = sys.argv[1:], os.path.basename(sys.argv[0])
    if "--help" in argv or "-h" in argv:
        with contextlib.suppress(BrokenPipeError):  # `--help | head`
            print(usage(main, name), flush=True)
        return
    try:
        check_command_line(main, argv, extra_flags)
        import fire

        fire.Fire(main, command=argv, name=name)
    except AlreadyDone as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, also when several processes run the stage
            print(e)
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _is_flag(token):  # fire's rule: a leading hyphen, unless it is a negative number
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def check_command_line(main, argv, extra_flags=None):
    """Raise a DiceError for what fire would only notice after `main` returned (or never): an unknown flag, a
    positional argument with no parameter to take it, a required flag missing. Mirrors fire's parsing: `--name=value`,
    `--name value`, `--flag` / `--noflag` for a flag followed by another flag or nothing."""
    kinds = inspect.Parameter
    sig = inspect.signature(main).parameters
    params = {n: p for n, p in sig.items() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    takes_rest = any(p.kind == kinds.VAR_POSITIONAL for p in sig.values())
    takes_options = any(p.kind == kinds.VAR_KEYWORD for p in sig.values())
    given, positional, others, i = set(), [], [], 0
    while i < len(argv):
        token = argv[i]
        if not _is_flag(token):
            positional.append(token)
            i += 1
            continue
        key = token.lstrip("-").split("=", 1)[0].replace("-", "_")
        bare = "=" not in token and (i + 1 == len(argv) or _is_flag(argv[i + 1]))
        if key in params:
            given.add(key)
        elif bare and key.startswith("no") and key[2:] in params:
            given.add(key[2:])
        elif takes_options and token.startswith("--") and key:
            others.append(key)
        else:
            raise DiceError(f"unknown flag {token.split('=', 1)[0]}{_did_you_mean(key, params)}; see --help")
        i += 1 if "=" in token or bare else 2  # --name value: the next token is the value
    if others and extra_flags is not None:  # a misspelt flag first: a missing one may be its consequence
        known = set(extra_flags())
        for key in others:
            if key not in known:
                raise DiceError(f"unknown flag --{key}{_did_you_mean(key, [*params, *known])}; see --help")
    free = [n for n, p in params.items() if n not in given and p.kind == kinds.POSITIONAL_OR_KEYWORD]
    if len(positional) > len(free) and not takes_rest:
        raise DiceError(f"unexpected argument {positional[len(free)]!r} (flags are written --name value); see --help")
    given |= set(free[: len(positional)])
    missing = [n for n, p in params.items() if p.default is p.empty and n not in given]
    if missing:
        raise DiceError(f"--{missing[0]} is required; see --help")


def _did_you_mean(key, names):
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


# ----------------------------------------------------------------------------- the declaration: signature + Args:

def help_lines(main):
    """{flag: its help text} from the `Args:` section of `main`'s docstring (continuation lines joined)."""
    lines, found, name = (inspect.getdoc(main) or "").splitlines(), {}, None
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return found
    for line in lines[start:]:
        match = re.match(r"^\s{4}(\*{0,2}\w+): ?(.*)$", line)
        if match:
            name = match.group(1).lstrip("*")
            found[name] = match.group(2).strip()
        elif name and line.startswith(" " * 8):
            found[name] += " " + line.strip()
        elif line.strip():
            break
    return found


def bounds(text):
    """The range at the end of a help line: "(>= 1)" -> [(">=", 1.0)], "(> 0, <= 1)" -> [(">", 0.0), ("<=", 1.0)]."""
    match = re.search(r"\(((?:[<>]=? ?-?[\d.]+(?:e-?\d+)?(?:, )?)+)\)\s*$", text or "")
    return [(op, float(v)) for op, v in re.findall(r"([<>]=?) ?(-?[\d.]+(?:e-?\d+)?)", match.group(1))] if match else []


def describe(kind):
    origin, members = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return " | ".join(map(str, members))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(k) for k in members if k is not type(None))
    if origin is list:
        return f"comma-separated {describe(members[0])}s"
    return getattr(kind, "__name__", str(kind))


def usage(main, name):
    """--help: the first paragraph of main's docstring, then every flag with its type, default and help line."""
    doc, helps = (inspect.getdoc(main) or "").split("\n\n")[0], help_lines(main)
    lines = [f"usage: python {name} --flag value ...", "", doc, "", "flags:"]
    for flag, p in inspect.signature(main).parameters.items():
        if p.kind == p.VAR_KEYWORD:
            lines.append(f"  --NAME VALUE    {helps.get(flag, 'other options')}")
            continue
        if p.kind == p.VAR_POSITIONAL:
            lines.append(f"  {flag.upper()} ...    {helps.get(flag, '')}")
            continue
        default = "required" if p.default is p.empty else f"default {p.default}"
        kind = describe(p.annotation) if p.annotation is not p.empty else "value"
        lines.append(f"  --{flag} ({kind}; {default})\n      {helps.get(flag, '')}")
    return "\n".join(lines)


def flags(main, values):
    """The values `main` received (its `locals()` on entry), converted to the signature's types and checked against
    the ranges of its `Args:` lines: a namespace in signature order. A value equal to a None default stays None, and
    so does an empty string there (an unset shell variable)."""
    helps, out = help_lines(main), {}
    for flag, p in inspect.signature(main).parameters.items():
        value = values.get(flag)
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.annotation is p.empty:
            out[flag] = value
        elif p.default is None and (value is None or value == ""):
            out[flag] = None
        else:
            out[flag] = convert(flag, value, p.annotation, bounds(helps.get(flag)))
    return SimpleNamespace(**out)


def convert(flag, value, kind, limits=()):
    """One value as `kind`; a DiceError naming --flag and what it must be."""
    origin, members = typing.get_origin(kind), typing.get_args(kind)
    bad = DiceError(f"--{flag} must be {_a(describe(kind))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        for member in members:
            if member is type(None):
                if value is None:
                    return None
                continue
            try:
                return convert(flag, value, member, limits)
            except DiceError as e:
                if re.search(r"must be [<>]", str(e)):  # the value is of this type but out of its range: say so
                    bad = e
        raise bad
    if origin is typing.Literal:
        found = [m for m in members if m == value or (isinstance(value, str) and str(m) == value)]
        if not found:
            raise DiceError(f"--{flag} must be one of {', '.join(map(str, members))}; got {value!r}")
        return found[0]
    if origin is list:
        items = list(value) if isinstance(value, (list, tuple)) else str("" if value is None else value).split(",")
        return [convert(flag, v, members[0], limits) for v in items if str(v).strip() != ""]
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if kind is str:
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if isinstance(value, bool) or value is None:
        raise bad
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if kind is int and isinstance(value, float) and value != number:
        raise bad
    if kind is float and number != number or number in (float("inf"), float("-inf")):
        raise DiceError(f"--{flag} must be finite, got {value!r}")
    for op, limit in limits:
        if not {">=": number >= limit, ">": number > limit, "<=": number <= limit, "<": number < limit}[op]:
            raise DiceError(f"--{flag} must be {op} {limit:g}, got {number:g}")
    return number


def _a(text):
    return ("an " if text[:1] in "aeiou" else "a ") + text if " " not in text else text


def load_script(name):
    """Import a stage script or tool (e.g. "02_score", "tools/report") as a module: 01-04 start with a digit, so
    `import` cannot. The scripts stay commands (`python 02_score.py ...`) that tests and benchmarks can import."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(os.path.basename(name), os.path.join(root, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
