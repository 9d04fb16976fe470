"""Write docs/CONFIG.md, the configuration reference, from the schema.

    python scripts/config_reference.py           # rewrite docs/CONFIG.md
    python scripts/config_reference.py --check   # exit 1, with one line, when docs/CONFIG.md is stale
    python scripts/config_reference.py --missing # list the schema fields that have no comment

Every key comes from the dataclasses of mnist_sweep/config.py (walked from ``Config``; a field typed ``Any`` takes
its per-option schemas from the ConfigStore group ``schema/<field>``, as ``optimizer`` does), and the Optuna
sweeper's schema. Its meaning is the ``# comment`` beside the field (or the comment lines right above it): that
comment is the one place a key's meaning is written. Its type is the field's annotation; its allowed values are the
rules the schema's ``_require`` checks; its default is the value ``python train.py`` composes from conf/. The config
groups and their options are the files under conf/.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
OUT = ROOT / "docs" / "CONFIG.md"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from the checkout, installed or not

ABSENT = object()


@dataclasses.dataclass
class Key:
    name: str  # dotted, as on the command line: model.hidden
    type: str  # the annotation, as written in the schema
    meaning: str  # the comment beside the field; "" when it has none
    where: str  # file:line of the field, to say where a missing comment goes
    section: str  # the dotted path of the dataclass holding it ("" at the top level)
    options: tuple[str, ...] = ()  # per-option schemas (optimizer): the options that have this key, if not all
    per_option: bool = False  # from per-option schemas: its default may differ by option
    checks: list[str] = dataclasses.field(default_factory=list)
    default: str = ""  # as shown
    value: Any = None  # the composed default itself (a check that names only its group finds its key by it)


# --- comments beside dataclass fields ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    tree: ast.Module
    trailing: dict[int, str]  # line -> a comment after code on that line
    alone: dict[int, str]  # line -> a comment that is the whole line


_sources: dict[Path, _Source] = {}


def _source(path: Path) -> _Source:
    if path not in _sources:
        text = path.read_text()
        trailing: dict[int, str] = {}
        alone: dict[int, str] = {}
        code_lines: set[int] = set()
        ignore = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
        with path.open("rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type == tokenize.ENCODING or tok.type in ignore:
                    continue
                line = tok.start[0]
                if tok.type == tokenize.COMMENT:
                    text_ = tok.string.lstrip("#").strip()
                    (trailing if line in code_lines else alone)[line] = text_
                else:
                    code_lines.update(range(tok.start[0], tok.end[0] + 1))
        _sources[path] = _Source(ast.parse(text), trailing, alone)
    return _sources[path]


def _class_node(cls: type) -> tuple[Path, ast.ClassDef] | None:
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file)
    for node in ast.walk(_source(path).tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return path, node
    return None


def _field_node(cls: type, name: str) -> tuple[Path, ast.AnnAssign] | None:
    found = _class_node(cls)
    if found is None:
        return None
    path, node = found
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
            return path, stmt
    return None


def _comment(path: Path, stmt: ast.AnnAssign) -> str:
    """The comment lines right above the field, then the comment at the end of its line(s)."""
    src = _source(path)
    above: list[str] = []
    line = stmt.lineno - 1
    while line in src.alone:
        above.insert(0, src.alone[line])
        line -= 1
    end = stmt.end_lineno or stmt.lineno
    beside = [src.trailing[i] for i in range(stmt.lineno, end + 1) if i in src.trailing]
    return " ".join(part for part in (*above, *beside) if part)


def describe_field(cls: type, name: str) -> tuple[str, str, str]:
    """(annotation, comment, file:line) of a dataclass field; the comment may come from a base class."""
    annotation, where, meaning = "", "", ""
    for klass in cls.__mro__:
        found = _field_node(klass, name)
        if found is None:
            continue
        path, stmt = found
        if not annotation:
            annotation = ast.unparse(stmt.annotation)
            where = f"{_relative(path)}:{stmt.lineno}"
        meaning = _comment(path, stmt)
        if meaning:
            break
    return annotation, meaning, where


def describe_class(cls: type) -> str:
    """The docstring of the class (or of the nearest base that has one), paragraphs kept apart."""
    for klass in cls.__mro__:
        found = _class_node(klass)
        if found and (doc := ast.get_docstring(found[1])):
            return "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))
    return ""


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


# --- the keys: a walk of the schema ------------------------------------------------------------------------------


def _schema_options(field_name: str) -> dict[str, type]:
    """The per-option schemas of a field typed Any: ConfigStore group schema/<field> (e.g. optimizer: sgd, adam)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    group = ConfigStore.instance().repo.get("schema", {}).get(field_name, {})
    out = {}
    for name in sorted(group):
        node = group[name]
        if hasattr(node, "node"):
            out[name.removesuffix(".yaml")] = OmegaConf.get_type(node.node)
    return out


def walk(cls: type, prefix: str = "") -> list[Key]:
    """Every leaf of the dataclass ``cls``, depth first, in field order."""
    hints = typing.get_type_hints(cls)
    keys: list[Key] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        name = prefix + f.name
        if dataclasses.is_dataclass(hint):
            keys += walk(hint, name + ".")
        elif hint is Any and not prefix and (options := _schema_options(f.name)):
            keys += _walk_options(options, name + ".")
        else:
            annotation, meaning, where = describe_field(cls, f.name)
            keys.append(Key(name, annotation, meaning, where, prefix.rstrip(".")))
    return keys


def _walk_options(options: dict[str, type], prefix: str) -> list[Key]:
    merged: dict[str, Key] = {}
    for option, cls in options.items():
        for key in walk(cls, prefix):
            if key.name not in merged:
                merged[key.name] = key
            merged[key.name].options += (option,)
            merged[key.name].per_option = True
    for key in merged.values():
        # A key several options share takes its meaning from their common base class where that has a comment
        # (OptimizerConfig.lr); a comment on one option's field is that option's reason for its default.
        classes = [options[o] for o in key.options]
        common = [c for c in classes[0].__mro__ if all(c in k.__mro__ for k in classes)]
        field_name = key.name.rsplit(".", 1)[-1]
        for base in common if len(classes) > 1 else ():
            if _field_node(base, field_name) is not None:
                meaning = describe_field(base, field_name)[1]
                if meaning:
                    key.meaning = meaning
                break
        if key.options == tuple(options):
            key.options = ()  # every option has it
    return list(merged.values())


def _attach_checks(keys: list[Key], config: Any) -> None:
    """The rules each key is checked against: every ``_require`` call a default instance makes, recorded."""
    require = getattr(config, "_require", None)
    if require is None:
        raise SystemExit("mnist_sweep.config has no _require(ok, key, value, rule, example): update this script")
    seen: list[tuple[str, Any, str]] = []

    def record(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
        seen.append((key, value, rule))

    classes: list[type] = []
    for key in keys:
        parts = key.name.split(".")
        for depth in range(1, len(parts)):
            cls = _class_at(config.Config, parts[:depth], key.options)
            for c in cls:
                if c not in classes:
                    classes.append(c)
    config._require = record
    try:
        for cls in classes:
            cls()  # its defaults, every check run and recorded, none raised
    finally:
        config._require = require
    by_name = {k.name: k for k in keys}
    for name, value, rule in seen:
        key = by_name.get(name)
        if key is None:  # a check named by its group (device=cuda): the group's key holding that value
            matches = [k for k in keys if k.name.startswith(name + ".") and k.value == value]
            key = matches[0] if len(matches) == 1 else None
        if key is not None and rule not in key.checks:
            key.checks.append(rule)


def _class_at(root: type, path: list[str], options: tuple[str, ...]) -> list[type]:
    """The dataclass(es) at a dotted path below ``root``: several where a field has per-option schemas."""
    current = [root]
    for i, part in enumerate(path):
        nxt = []
        for cls in current:
            hint = typing.get_type_hints(cls)[part]
            if dataclasses.is_dataclass(hint):
                nxt.append(hint)
            elif hint is Any and i == 0:
                schemas = _schema_options(part)
                nxt += [c for o, c in schemas.items() if not options or o in options]
        current = nxt
    return current


def sweeper_keys(composed: dict[str, Any]) -> list[tuple[str, type, list[Key]]]:
    """(option, schema, keys) of each sweeper in conf/hydra/sweeper whose schema is ours (not Hydra's own)."""
    out = []
    for option, schema in composed["sweepers"].items():
        if schema is None or schema.__module__.split(".")[0] == "hydra":
            continue
        keys = walk(schema, "hydra.sweeper.")
        for key in keys:
            key.section = "hydra.sweeper"
        out.append((option, schema, keys))
    return out


# --- defaults and options: composed from conf/ -------------------------------------------------------------------


def groups() -> dict[str, list[str]]:
    """Each config group under conf/ (``hydra/launcher`` included) and its options, in name order."""
    out: dict[str, list[str]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != ".":
            out.setdefault(group, []).append(path.stem)
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def compose_all() -> dict[str, Any]:
    """The default config, the default option of each group, and each run group's options composed in turn."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mnist_sweep import config

    config.register()
    found = groups()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose(config_name="config", return_hydra_config=True)
        choices = OmegaConf.to_container(full.hydra.runtime.choices)
        default = flatten(OmegaConf.to_container(compose(config_name="config"), resolve=False))
        options: dict[str, dict[str, dict[str, Any]]] = {}
        for group, names in found.items():
            if "/" in group or group not in {f.name for f in dataclasses.fields(config.Config)}:
                continue
            options[group] = {}
            for name in names:
                cfg = compose(config_name="config", overrides=[f"{group}={name}"])
                options[group][name] = flatten(OmegaConf.to_container(cfg[group], resolve=False), f"{group}.")
        sweepers: dict[str, Any] = {}
        sweeper_values: dict[str, dict[str, Any]] = {}
        for name in found.get("hydra/sweeper", []):
            cfg = compose(config_name="config", overrides=[f"hydra/sweeper={name}"], return_hydra_config=True)
            sweepers[name] = OmegaConf.get_type(cfg.hydra.sweeper)
            sweeper_values[name] = flatten(OmegaConf.to_container(cfg.hydra.sweeper, resolve=False), "hydra.sweeper.")
    return {
        "groups": found,
        "choices": choices,
        "default": default,
        "options": options,
        "sweepers": sweepers,
        "sweeper_values": sweeper_values,
    }


def fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _attach_defaults(keys: list[Key], composed: dict[str, Any]) -> None:
    default = composed["default"]
    for key in keys:
        group = key.name.split(".")[0]
        if key.name.startswith("hydra.sweeper."):
            values = {o: flat.get(key.name, ABSENT) for o, flat in composed["sweeper_values"].items()}
            key.default = fmt(next(v for v in values.values() if v is not ABSENT))
            continue
        value = default.get(key.name, ABSENT)
        if not key.per_option and value is not ABSENT:
            key.default = fmt(value)
            continue
        per_option = {o: flat.get(key.name, ABSENT) for o, flat in composed["options"].get(group, {}).items()}
        per_option = {o: v for o, v in per_option.items() if v is not ABSENT}
        if value is not ABSENT:
            others = [f"{o}: {fmt(v)}" for o, v in per_option.items() if v != value]
            key.default = fmt(value) + (f" ({', '.join(others)})" if others else "")
        else:
            by_value: dict[str, list[str]] = {}
            for o, v in per_option.items():
                by_value.setdefault(fmt(v), []).append(o)
            key.default = "; ".join(f"{v} ({', '.join(os)})" for v, os in by_value.items())


def reference() -> tuple[list[Key], list[tuple[str, type, list[Key]]], dict[str, Any]]:
    """The keys of the run config and of our sweeper, with their defaults and checks, and the composed configs."""
    composed = compose_all()
    from mnist_sweep import config

    config.register()
    keys = walk(config.Config)
    for key in keys:
        key.value = composed["default"].get(key.name)
    _attach_checks(keys, config)
    _attach_defaults(keys, composed)
    sweepers = sweeper_keys(composed)
    for _, _, skeys in sweepers:
        _attach_defaults(skeys, composed)
    return keys, sweepers, composed


# --- the page ----------------------------------------------------------------------------------------------------


def yaml_summary(path: Path) -> str:
    """The first sentence of the comment block that opens a YAML file (after ``# @package``; an indented comment
    line, such as a command, ends the block)."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        text = stripped[1:]
        if text.strip().startswith("@package"):
            continue
        if not text.strip() or text.startswith("  "):
            break
        lines.append(text.strip())
    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s+", " ".join(lines), maxsplit=1)[0]


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_changes(group: str, option: str, composed: dict[str, Any]) -> str:
    flats = composed["options"].get(group)
    if not flats or option not in flats:
        return ""
    base = {k: v for k, v in composed["default"].items() if k.startswith(group + ".")}
    changed = [
        f"`{k[len(group) + 1 :]}={fmt(v)}`"
        for k, v in flats[option].items()
        if base.get(k, ABSENT) != v and not k.rsplit(".", 1)[-1].startswith("_")
    ]
    return " ".join(changed)


def render() -> str:
    keys, sweepers, composed = reference()
    choices = composed["choices"]
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from mnist_sweep/config.py and conf/; do not edit by hand.",
        "     Edit the schema's comments or the presets, then run: python scripts/config_reference.py -->",
        "",
        "Every key below can be set on the command line (`python train.py key=value`) and swept"
        " (`python train.py -m key=a,b,c`); a config group's option is chosen with `group=option`, and a preset of"
        " `conf/experiment/` with `experiment=NAME`. The default is the value `python train.py` runs with;"
        " `python train.py --cfg job` prints the whole composed config. A value of the wrong type or an unknown key is"
        " refused while Hydra composes the config, a value out of range (the *checked* column) before anything is"
        " loaded or trained: either way in one line that names the key and the fix.",
        "",
        "Meanings are the comments beside each field of the schema (`mnist_sweep/config.py`); this page is written"
        " from them by `python scripts/config_reference.py`, and `tests/test_config_reference.py` fails when it is"
        " stale.",
        "",
        "## Config groups",
        "",
        "| group | option | what it is | sets, against the default |",
        "| --- | --- | --- | --- |",
    ]
    for group, names in composed["groups"].items():
        chosen = choices.get(group)
        listed = list(names)
        if chosen is not None and chosen not in listed:
            listed.insert(0, chosen)
        for i, name in enumerate(listed):
            path = CONF / group / f"{name}.yaml"
            what = yaml_summary(path) if path.exists() else "Hydra's own"
            label = f"`{name}`" + (" (default)" if name == chosen else "")
            changes = "" if name == chosen else _option_changes(group, name, composed)
            out.append(f"| {f'`{group}`' if i == 0 else ''} | {label} | {cell(what)} | {cell(changes)} |")
    if "experiment" in composed["groups"] and choices.get("experiment") is None:
        out += ["", "No experiment preset is applied by default; each file says what it sets."]

    sections: dict[str, list[Key]] = {}
    for key in keys:
        sections.setdefault(key.section, []).append(key)
    for _, _, skeys in sweepers:
        for key in skeys:
            sections.setdefault(key.section, []).append(key)
    from mnist_sweep import config

    for section, members in sections.items():
        out += ["", f"## `{section}`" if section else "## Top level", ""]
        intro = _section_intro(section, config, sweepers)
        if intro:
            out += [intro, ""]
        out += ["| key | type | default | meaning | checked |", "| --- | --- | --- | --- | --- |"]
        for key in members:
            meaning = key.meaning or "*(no comment in the schema)*"
            if key.options:
                group = key.name.split(".")[0]
                only = ", ".join(f"`{group}={o}`" for o in key.options)
                meaning = f"Only with {only}. {meaning}"
            out.append(
                f"| `{key.name}` | `{cell(key.type)}` | `{cell(key.default)}` | {cell(meaning)} |"
                f" {cell('; '.join(key.checks))} |"
            )
    return "\n".join(out) + "\n"


def _section_intro(section: str, config: Any, sweepers: list[tuple[str, type, list[Key]]]) -> str:
    if section == "hydra.sweeper":
        names = ", ".join(f"`hydra/sweeper={o}`" for o, _, _ in sweepers)
        docs = " ".join(describe_class(s) for _, s, _ in sweepers)
        return f"With {names}; set as `hydra.sweeper.KEY=VALUE`. {docs}".strip()
    if not section:
        return describe_class(config.Config)
    classes = _class_at(config.Config, section.split("."), ())
    return describe_class(classes[0]) if classes else ""


def missing() -> list[str]:
    keys, sweepers, _ = reference()
    every = keys + [k for _, _, skeys in sweepers for k in skeys]
    return [f"{k.where}: {k.name}" for k in every if not k.meaning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale; write nothing")
    parser.add_argument("--missing", action="store_true", help="list the schema fields without a comment")
    parser.add_argument("--out", type=Path, default=OUT, help="the page to write or check (default docs/CONFIG.md)")
    args = parser.parse_args(argv)
    if args.missing:
        lines = missing()
        print("\n".join(lines) if lines else "every key has a comment")
        return 1 if lines else 0
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{_relative(args.out)} is stale: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {_relative(args.out)} ({len(keys_of(text))} keys)")
    return 0


def keys_of(text: str) -> list[str]:
    """The keys a generated page documents (the first cell of each key row)."""
    return re.findall(r"^\| `([A-Za-z_][\w.]*)` \| `", text, flags=re.MULTILINE)


if __name__ == "__main__":
    sys.exit(main())
