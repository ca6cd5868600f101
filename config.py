"""Command-line configuration: one dataclass per script; `--field=value` flags parsed by the field's type, unknown
keys rejected with the valid ones, `--preset=name` applied first, `--help` listing each field's default and comment.

    cfg = parse_config(TrainConfig, sys.argv[1:], presets=TRAIN_PRESETS)
"""

import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import typing

HELP_FLAGS = ("--help", "-h")


class ConfigError(ValueError):
    """A bad command-line flag. Scripts print the message and exit with status 2."""


def _parse_value(name: str, text: str, typ):
    """Parse `text` as the field's declared type (bool, int, float, str or Optional of one)."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if text.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    if typ is bool and text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return text.lower() in ("1", "true", "yes", "on")
    if typ is bool:
        raise ConfigError(f"--{name}={text}: expected a boolean (true/false/1/0)")
    if typ is str:
        return text
    if typ not in (int, float):
        raise ConfigError(f"--{name}: unsupported field type {typ!r}")
    try:
        return int(text.replace("_", "")) if typ is int else float(text)
    except ValueError:
        pass
    with contextlib.suppress(ValueError, OverflowError):  # 1e5-style integers
        if typ is int and float(text) == int(float(text)):
            return int(float(text))
    raise ConfigError(f"--{name}={text}: expected {'an integer' if typ is int else 'a number'}")


def _field_comments(cls) -> dict[str, str]:
    """The comment after each field in the class's source (`name: type = default  # comment`), where any."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, name, column = {}, None, -1
    for line in source.splitlines():
        field = re.match(r"\s+(\w+)\s*:[^#]*?(#\s?(.*))?$", line)  # a comment-only line never matches
        more = re.match(r"(\s+)#\s?(.*)$", line)
        if field:
            name, column = field.group(1), line.find("#")  # -1 when the field has no comment
            if field.group(2):
                comments[name] = field.group(3).strip()
        elif more and name in comments and len(more.group(1)) == column:  # continued under the field's comment
            comments[name] += " " + more.group(2).strip()
        else:
            name = None
    return comments


def usage(cls, presets: dict[str, dict] | None = None) -> str:
    """What --help prints: the script docstring's first paragraph, every field's type, default and comment, presets."""
    script = sys.modules["__main__"]
    name = os.path.basename(getattr(script, "__file__", None) or "SCRIPT.py")
    lines = [f"usage: python {name} [--field=value ...]"]
    doc = (script.__doc__ or "").strip().split("\n\n")[0]
    if doc:
        lines += ["", doc]
    comments, hints = _field_comments(cls), typing.get_type_hints(cls)
    lines += ["", f"{cls.__name__} fields (--field=value; a boolean also takes --field alone):"]
    for f in dataclasses.fields(cls):
        default = (json.dumps(f.default) if f.default is not dataclasses.MISSING
                   else "(computed)" if f.default_factory is not dataclasses.MISSING else "(required)")
        hint = hints[f.name]
        typ = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"  --{f.name}={default}  [{typ}]" + (f"  {comments[f.name]}" if f.name in comments else ""))
    if presets:
        lines += ["", "--preset=NAME applies a named recipe first (explicit flags override it): " + ", ".join(presets)]
    return "\n".join(lines)


def parse_config(cls, argv: list[str], presets: dict[str, dict] | None = None, **base):
    """`cls` from `--field=value` flags (`--flag` alone: True for a boolean): `base`, then `--preset=NAME` (an entry of
    `presets`: field overrides), then the flags. `--help` or `-h` prints usage(cls, presets) and exits with status 0."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(usage(cls, presets))
        sys.exit(0)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    valid = ", ".join(sorted(fields | ({"preset"} if presets is not None else set())))
    values, preset_name = {}, None
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --field=value. Valid fields: {valid}")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "preset" and presets is not None:
            if text not in presets:
                raise ConfigError(f"--preset={text}: unknown preset. Choose one of: {', '.join(presets)}")
            preset_name = text
            continue
        if key not in fields:
            raise ConfigError(f"unknown flag --{key}. Valid fields: {valid} (--help lists them with their defaults)")
        if not eq:
            if bool not in (hints[key], *typing.get_args(hints[key])):  # bool or Optional[bool]
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            text = "true"
        values[key] = _parse_value(key, text, hints[key])
    merged = dict(base)
    if preset_name is not None:
        merged.update(presets[preset_name], **({"preset": preset_name} if "preset" in fields else {}))
    merged.update(values)
    return cls(**merged)


def config_dict(cfg) -> dict:
    """The config as a plain dict of primitives (safe for JSON and torch.load(weights_only=True))."""
    return dataclasses.asdict(cfg)


def print_config(cfg, file=None):
    """Print the resolved config, one `field = value` a line."""
    rows = [f"  {k} = {json.dumps(v)}" for k, v in config_dict(cfg).items()]
    print(f"{type(cfg).__name__}:", *rows, sep="\n", file=file)  # file None: stdout


def main_guard(main):
    """Run `main()`; turn a ConfigError (or other user error) into a message on stderr and exit 2."""
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
