"""One config mechanism for every script: dataclass defaults <- YAML file <- `--field value` on the command line.

Unknown keys are an error that names the key and where it came from (the YAML file or the command line), so a
typo never silently trains with a default. Values from the command line are parsed as YAML scalars
(`--lr 3e-4`, `--lora_r 0`, `--model_config '{hidden_size: 64}'`) and checked against the field's type.
`--help` lists every field with its type, default and the `#` comment that documents it in the source.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml


class ConfigError(SystemExit):
    """A config problem the user must fix; exits with a one-line message instead of a traceback."""

    def __init__(self, message: str):
        super().__init__(f"config error: {message}")


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, annotation, key: str, origin: str):
    """Check `value` against `annotation`, converting the few safe cases (int -> float, str path -> str)."""
    args = typing.get_args(annotation)
    kind = typing.get_origin(annotation)
    if kind in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, origin)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{origin}: key '{key}' has value {value!r}, which is not a {annotation}")
    if kind is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{origin}: key '{key}' must be one of {list(args)}, got {value!r}")
    if kind in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `--inputs /data/papers` means a list of one
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else object
            items = [_coerce(v, inner, key, origin) if inner is not object else v for v in value]
            return list(items) if kind is list else tuple(items)
        raise ConfigError(f"{origin}: key '{key}' must be a list, got {value!r}")
    if kind is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{origin}: key '{key}' must be a mapping, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: key '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: key '{key}' must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{origin}: key '{key}' must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{origin}: key '{key}' must be a string, got {value!r}")
    return value


def _apply(values: dict, types_: dict, origin: str) -> dict:
    out = {}
    for key, value in values.items():
        if key not in types_:
            close = [k for k in types_ if k.replace("_", "") == str(key).replace("_", "").replace("-", "")]
            close = close or difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin}: unknown key '{key}'{hint}; --help lists the keys")
        out[key] = _coerce(value, types_[key], key, origin)
    return out


def _parse_cli(argv: list[str]) -> tuple[str | None, dict]:
    config_file, values = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got '{arg}'")
        key, eq, inline = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            raw = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:  # a bare flag means true
            raw = "true"
            i += 1
        if key == "config":
            config_file = raw
        else:
            values[key] = raw
    return config_file, values


def _parse_value(raw: str, annotation):
    """Command-line text as YAML (numbers, lists, mappings), except for plain-string fields, which keep it verbatim."""
    if annotation is str:
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _class_comments(klass) -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """The `#` comments documenting each field of `klass`'s own body (the lines directly above it, then the one on
    its line) and its groups: runs of fields split by blank lines, titled by a comment block standing alone."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(inspect.getsource(klass))).readline))
    except (OSError, TypeError, tokenize.TokenError, IndentationError):  # no source file (e.g. a REPL class)
        return {}, [("", list(vars(klass).get("__annotations__", {})))]
    docs, groups, above, current, depth = {}, [("", [])], [], None, 0
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        # a comment before the first field comes ahead of the body's INDENT token
        elif tok.type == tokenize.COMMENT and (depth == 1 or depth == 0 and tok.line.lstrip().startswith("#")):
            text = tok.string.lstrip("#").strip()
            (docs.setdefault(current, []) if current else above).append(text)
        elif tok.type == tokenize.NL and not tok.line.strip():  # a blank line ends a group
            if above or groups[-1][1]:
                groups.append((" ".join(above), []))
            above = []
        elif tok.type == tokenize.NEWLINE:
            current, above = None, []
        elif (depth == 1 and current is None and tok.type == tokenize.NAME and tokens[i - 1].type in
              (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
              and tokens[i + 1].string == ":"):
            current = tok.string
            docs[current], above = above, []
            groups[-1][1].append(current)
    return {k: " ".join(v) for k, v in docs.items() if v}, [g for g in groups if g[1]]


def _show(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_show(a) for a in typing.get_args(annotation))
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def print_help(cls) -> None:
    """Usage, then each field as `--name type = default  comment`, grouped by the class (and blank-line groups)
    that declares it: the script's own class first, then the ones it inherits from (e.g. loop.TrainConfig)."""
    doc = vars(cls).get("__doc__") or ""
    doc = "" if doc.startswith(cls.__name__ + "(") else doc.strip().splitlines()[0] if doc.strip() else ""
    lines = [f"usage: {Path(sys.argv[0]).name} [--config FILE.yaml] [--field value ...]", *([doc] if doc else []),
             "Values are YAML (3e-4, [a, b], '{k: v}'); a bare --flag is true. Command line > --config file > default."]
    fields, types_, shown = {f.name: f for f in dataclasses.fields(cls)}, _field_types(cls), set()
    classes = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    comments = [_class_comments(k) for k in classes]
    for klass, (_, groups) in zip(classes, comments):
        for title, names in groups:
            names = [n for n in names if n in fields and n not in shown]
            if not names:
                continue
            module = klass.__module__ if klass.__module__ != cls.__module__ else ""
            lines += ["", f"{module + '.' if module else ''}{klass.__name__}{': ' + title if title else ''}"]
            for name in names:
                shown.add(name)
                f = fields[name]
                default = ("= " + json.dumps(f.default, default=str) if f.default is not dataclasses.MISSING else
                           "= " + json.dumps(f.default_factory(), default=str)
                           if f.default_factory is not dataclasses.MISSING else "(required)")
                note = next((docs[name] for docs, _ in comments if name in docs), "")
                lines.append(f"  --{name} {_show(types_[name])} {default}" + (f"  # {note}" if note else ""))
    print("\n".join(lines))


def load_config(cls, argv: list[str] | None = None):
    """Build a `cls` dataclass from defaults, then `--config FILE.yaml`, then `--key value` pairs in argv."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print_help(cls)
        raise SystemExit(0)
    types_ = _field_types(cls)
    config_file, cli_values = _parse_cli(argv)
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file '{config_file}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{config_file}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: top level must be a mapping of key: value")
        values.update(_apply(loaded, types_, config_file))
    cli_values = {k: _parse_value(raw, types_.get(k)) for k, raw in cli_values.items()}
    values.update(_apply(cli_values, types_, "command line"))
    return cls(**values)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as JSON (beside checkpoints and final exports) so a run is reproducible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    tmp.replace(path)
