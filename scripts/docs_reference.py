"""The documentation's reference pages, generated from the code at build time (a MkDocs hook, mkdocs.yml).

- reference/http-api.md  from the FastAPI app's OpenAPI schema (service.main.create_app)
- reference/cli.md       from the argparse parser of every entry point in pyproject.toml's [project.scripts]
- reference/settings.md  from service.settings.Settings (field, VAE_ variable, type, default, description)

Nothing is written to docs/: the pages are added to the build as generated files, so they cannot go stale.
`python scripts/docs_reference.py OUT_DIR` writes them to OUT_DIR to read them without a build.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tomllib
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PAGES = ("reference/http-api.md", "reference/cli.md", "reference/settings.md")
GENERATED = "<!-- generated from the code by scripts/docs_reference.py at build time: do not edit -->\n\n"


def cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").strip()


def code(text: Any) -> str:
    text = str(text).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


# --- settings ---------------------------------------------------------------------------------------


def settings_page(settings_cls: Any) -> str:
    """Every field of a pydantic-settings class: its environment variable, type, default and description."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    lines = [
        GENERATED + "# Settings\n",
        f"The service reads one `{settings_cls.__name__}` object (`{settings_cls.__module__}`) when the app is "
        f"built: each field from the environment variable `{prefix}<FIELD>` (upper case); `vae-serve`'s flags "
        "([CLI](cli.md)) set the common ones and win. Lists are comma-separated.\n",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, f in settings_cls.model_fields.items():
        if f.default_factory is not None:
            default = f.default_factory()
        else:
            default = f.default
        shown = "none" if default in (None, []) else code(default)
        kind = _kind(f.annotation)
        lines.append(f"| `{prefix}{name.upper()}` | {cell(kind)} | {shown} | {cell(f.description or '')}{_bounds(f)} |")
    return "\n".join(lines) + "\n"


def _kind(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _bounds(field: Any) -> str:
    out = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
    return f" ({', '.join(out)})" if out else ""


# --- command lines ----------------------------------------------------------------------------------


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(target: str) -> argparse.ArgumentParser:
    """The parser behind an entry point 'module:function': the module's build_parser() where it has one,
    else the parser the function builds, caught when it parses (the function does nothing else)."""
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    if func_name == "main" and hasattr(module, "build_parser"):
        return module.build_parser()
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        getattr(module, func_name)([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{target} did not parse a command line")


def entry_points(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    return dict(tomllib.loads(pyproject.read_text())["project"]["scripts"])


def _option_row(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    names = ", ".join(action.option_strings) or action.dest
    if action.nargs != 0:
        meta = formatter._format_args(action, action.dest.upper())
        names += " " + meta
    text = formatter._expand_help(action) if action.help else ""
    if action.choices is not None and "{" not in names:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return f"| {code(names)} | {cell(text)} |"


def cli_section(name: str, target: str, parser: argparse.ArgumentParser) -> str:
    parser.prog = name
    first, *rest = parser.format_usage().strip().removeprefix("usage: ").splitlines()
    usage = "\n".join([first] + [line.removeprefix(" " * len("usage: ")) for line in rest])
    lines = [f"## `{name}`\n", f"Entry point `{target}`.\n", cell(parser.description or "") + "\n"]
    lines.append(f"```text\n{usage}\n```\n")
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = group.title or "options"
        lines += [f"**{title[0].upper() + title[1:]}**\n", "| option | meaning |", "|---|---|"]
        lines += [_option_row(parser, a) for a in actions]
        lines.append("")
    return "\n".join(lines)


def cli_page(parsers: Iterable[tuple[str, str, argparse.ArgumentParser]]) -> str:
    parts = [
        GENERATED + "# Command lines\n",
        "Every entry point that `pip install` puts on the PATH (pyproject.toml's `[project.scripts]`), with the "
        "options of its own argument parser; `NAME --help` prints the same.\n",
    ]
    parts += [cli_section(name, target, parser) for name, target, parser in parsers]
    return "\n".join(parts)


# --- HTTP API ---------------------------------------------------------------------------------------


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


def _type(schema: dict[str, Any]) -> str:
    name = _ref_name(schema)
    if name:
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(dict.fromkeys(_type(s) for s in schema["anyOf"]))
    if "enum" in schema:
        return " \\| ".join(code(json.dumps(v)) for v in schema["enum"])
    if "const" in schema:
        return code(json.dumps(schema["const"]))
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if schema.get("format") == "binary":
        return "file"
    return str(kind)


def _limits(schema: dict[str, Any]) -> str:
    out = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            out.append(f"{sign} {schema[key]}")
    for key, text in (("minItems", "at least {} items"), ("maxItems", "at most {} items")):
        if key in schema:
            out.append(text.format(schema[key]))
    return ", ".join(out)


def _properties_table(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    lines = ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        default = code(json.dumps(prop["default"])) if "default" in prop else ""
        limits = _limits(prop)
        desc = cell(prop.get("description", "")) + (f" ({limits})" if limits else "")
        yes = "yes" if name in required else ""
        lines.append(f"| `{name}` | {_type(prop)} | {yes} | {default} | {desc} |")
    return lines


def openapi_page(schema: dict[str, Any]) -> str:
    lines = [
        GENERATED + "# HTTP API\n",
        f"{schema['info']['title']} {schema['info']['version']}, generated from the service's OpenAPI schema "
        "(`GET /openapi.json`; Swagger UI at `/docs` on a running service, with the served models' shapes and "
        'the settings\' limits filled in). Every JSON API error is `{"error": {"status", "code", '
        '"message", "where"}}` ([ErrorResponse](#errorresponse)); V2 errors are `{"error": "..."}`.\n',
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag, ops in by_tag.items():
        lines.append(f"## {tag}\n")
        for path, method, op in ops:
            lines.append(f"### `{method.upper()} {path}`\n")
            if op.get("summary"):
                lines.append(cell(op["summary"]) + "\n")
            if op.get("description"):
                lines.append(op["description"].strip() + "\n")
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required | description |", "|---|---|---|---|---|"]
                for p in params:
                    s = p.get("schema", {})
                    limits = _limits(s)
                    desc = cell(p.get("description", s.get("description", ""))) + (f" ({limits})" if limits else "")
                    req = "yes" if p.get("required") else ""
                    lines.append(f"| `{p['name']}` | {p['in']} | {_type(s)} | {req} | {desc} |")
                lines.append("")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                s = content.get("schema", {})
                lines.append(f"Request body ({code(media)}): {_type(s)}\n")
            statuses = op.get("responses", {})
            if statuses:
                ok = [
                    f"{status} ({', '.join(map(code, r.get('content', {}))) or 'no body'})"
                    for status, r in statuses.items()
                    if status.startswith("2")
                ]
                errors = sorted(status for status in statuses if not status.startswith("2"))
                line = "Answers: " + "; ".join(ok)
                if errors:
                    line += f"; errors {', '.join(errors)} ([what each means](limits.md#errors))"
                lines.append(line + ".\n")
    lines.append("## Schemas\n")
    for name, s in sorted(schema.get("components", {}).get("schemas", {}).items()):
        lines.append(f"### {name}\n")
        if s.get("description"):
            lines.append(cell(s["description"]) + "\n")
        if s.get("properties"):
            lines += _properties_table(s)
            lines.append("")
        else:
            lines.append(f"Type: {_type(s)}\n")
    return "\n".join(lines)


# --- the pages, and the MkDocs hook -----------------------------------------------------------------


def pages() -> dict[str, Callable[[], str]]:
    def http_api() -> str:
        from service.main import create_app
        from service.settings import Settings

        # no repository scan: the schema of the API itself, not of the models some repository holds
        return openapi_page(create_app(Settings(models_dir=REPO / "models")).openapi())

    def cli() -> str:
        return cli_page((name, target, parser_of(target)) for name, target in entry_points().items())

    def settings() -> str:
        from service.settings import Settings

        return settings_page(Settings)

    return {"reference/http-api.md": http_api, "reference/cli.md": cli, "reference/settings.md": settings}


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated reference pages to the build."""
    from mkdocs.structure.files import File

    for uri, make in pages().items():
        files.append(File.generated(config, uri, content=make()))
    return files


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/reference")
    for uri, make in pages().items():
        target = out / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(make())
        print(target)
