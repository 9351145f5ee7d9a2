"""The shape the code keeps: which package may import which, and facts written once.

Read from the source (ast), so an import inside a function or behind TYPE_CHECKING
counts too; a new module that breaks a rule fails here, not in review."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bridge", "edge_agent", "callback_server", "demo")
# What each package may import of the others: the services share only bridge/, and the
# demo (run from the checkout, not shipped) is the one place that joins both.
MAY_IMPORT = {
    "bridge": set(),
    "edge_agent": {"bridge"},
    "callback_server": {"bridge"},
    "demo": {"bridge", "edge_agent", "callback_server"},
}


def modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_they_may(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in modules(package) for line, name in imported(path)
             if name in PACKAGES and name != package and name not in MAY_IMPORT[package]]
    assert wrong == []


def test_nothing_shipped_imports_the_tests_or_the_bench() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}" for package in PACKAGES
             for path in modules(package) for line, name in imported(path)
             if name in ("tests", "bench")]
    assert wrong == []


#: The robot clock bound's default (300 s), however it is written: 300, 300.0, 5 * 60,
#: minutes=5, with "skew" before or after it on the line.
SKEW = (r"(?i)skew.*(\b300\b|\b5 ?\* ?60\b|\b60 ?\* ?5\b|minutes ?= ?5\b)"
        r"|\b300\b.*skew")
#: A settings list split by hand: commas (and spaces) turned into items.
LIST_SPLIT = (r"replace\(\s*([\"']),\1\s*,\s*([\"']) \2\s*\)"
              r"|re\.split\(\s*r?[\"'][^\"']*,"
              r"|\.split\(\s*([\"']),\3\s*\)")


# Facts that live in one module: topic building (bridge/topic.py) and back-off with
# jitter (bridge/backoff.py). A literal of the topic scheme or a hand-made exponential
# delay elsewhere is a second copy that will drift (it did: a hand-built gateway filter
# ignored TOPIC_PREFIX normalisation).
ONE_PLACE = {
    r"org/\+/device/\+|f\"callback/\{": "bridge/topic.py",
    r"\bimport random\b|random\.uniform|2 \*\* ": "bridge/backoff.py",
    # issue 23: the robot clock bound's default, a settings list's split, and the SQL
    # list query's keyset page and org scope were each written 4-6 times. Each pattern
    # catches the spellings in SPELLINGS below, not only the one first found.
    SKEW: "bridge/clock.py",
    LIST_SPLIT: "bridge/service/settings_loader.py",
    r"LIMIT .*\+ ?1\b": "bridge/http/keyset.py",
    r"org_id IN \(": "callback_server/store/query.py",
}
#: Lines a pattern matches that are not the fact: a comma list of another grammar.
NOT_THE_FACT = {
    "edge_agent/pudu/schedule.py": "a schedule's year field (cron's 2030,2032 list)",
    "edge_agent/pudu/signing.py": "the fields of Pudu's hmac Authorization header",
}


@pytest.mark.parametrize(("pattern", "home"), ONE_PLACE.items())
def test_facts_written_once(pattern: str, home: str) -> None:
    found = re.compile(pattern)
    elsewhere = []
    for package in PACKAGES:
        for path in modules(package):
            rel = str(path.relative_to(ROOT))
            if rel == home or (pattern == LIST_SPLIT and rel in NOT_THE_FACT):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if found.search(code) and not code.strip().startswith(('"', "'", "``")):
                    elsewhere.append(f"{rel}:{n}: {line.strip()}")
    assert elsewhere == [], f"belongs in {home}"


#: Spellings of each fact a second copy would plausibly use (the guard must see them all).
SPELLINGS = {
    SKEW: ["max_skew: float = 300", "MAX_CLOCK_SKEW = 300.0", "skew_bound = 5 * 60",
           "max_clock_skew_seconds: float = Field(default=300, ge=0)",
           "DEFAULT_SKEW = timedelta(minutes=5)", 'Field(300, description="max skew")'],
    LIST_SPLIT: ['text.replace(",", " ").split()', "text.replace(',', ' ').split()",
                 're.split(r"[,\\s]+", text)', "re.split(r'[\\s,]+', text)",
                 'value.split(",")', "[p.strip() for p in value.split(',')]"],
    r"LIMIT .*\+ ?1\b": ['f" LIMIT {limit + 1}"', 'f"LIMIT {int(n)+1}"'],
}


@pytest.mark.parametrize("pattern", SPELLINGS)
def test_the_guards_see_each_spelling(pattern: str) -> None:
    missed = [line for line in SPELLINGS[pattern] if not re.search(pattern, line)]
    assert missed == []


def _adds_one_to_a_limit(node: ast.AST) -> bool:
    """``limit + 1`` (or ``self.limit+1``, ``int(limit) + 1``, ``1 + limit``): the keyset
    page's one row more, spelled in Python."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return False
    for side, other in ((node.left, node.right), (node.right, node.left)):
        if isinstance(other, ast.Constant) and other.value == 1 \
                and "limit" in ast.unparse(side).lower():
            return True
    return False


def test_a_page_is_fetched_one_row_long_only_by_the_keyset_module() -> None:
    """``limit + 1`` (rows asked for: the page and one more, the sign of a next page) is
    bridge/http/keyset.py's: the edge's journal and two in-memory lists once each wrote
    their own. The SQL spelling is ONE_PLACE's; this is the Python one."""
    home = ROOT / "bridge" / "http" / "keyset.py"
    found = [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}: {ast.unparse(node)}"
             for package in PACKAGES for path in modules(package) if path != home
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if _adds_one_to_a_limit(node)]
    assert found == [], "fetch the page with bridge.http.keyset"
    sample = ast.parse("rows[:limit + 1]; q(1+self.limit); f(int(limit) + 1); n + 1")
    assert sum(_adds_one_to_a_limit(n) for n in ast.walk(sample)) == 3


def test_the_list_shape_is_built_in_one_place() -> None:
    """``{"items", "next_cursor"}`` is bridge.http.paging's to build: a dict literal with a
    ``next_cursor`` key anywhere else is a second page shape that will drift."""
    wrong = []
    for package in PACKAGES:
        for path in modules(package):
            if path.relative_to(ROOT) == Path("bridge/http/paging.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Dict) and any(
                        isinstance(k, ast.Constant) and k.value == "next_cursor"
                        for k in node.keys):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert wrong == [], "build it with bridge.http.paging.Page (or answer)"


def test_the_console_reads_the_robot_commands_it_offers() -> None:
    """The console's forms come from bridge/pudu/command_catalogue.py (via /console/me), the
    catalogue the gateway runs: a command name written in its JS is a second copy."""
    from bridge.pudu.command_catalogue import ROBOT_COMMANDS
    static = ROOT / "callback_server" / "console" / "static"
    names = [c["name"] for c in ROBOT_COMMANDS]
    copies = [f"{path.name}: {name}" for path in sorted(static.glob("*.js"))
              for name in names if name in path.read_text(encoding="utf-8")]
    assert names and copies == []


def test_the_services_settings_share_their_common_fields() -> None:
    """A setting both services declare alike belongs to
    bridge.service.settings_loader.ServiceSettings; one each declares on its own
    differs (a default, at least)."""
    from callback_server.settings import CallbackSettings
    from edge_agent.settings import EdgeSettings
    own = {cls: set(cls.__annotations__) for cls in (EdgeSettings, CallbackSettings)}
    both = own[EdgeSettings] & own[CallbackSettings]
    alike = sorted(name for name in both if repr(EdgeSettings.model_fields[name]) ==
                   repr(CallbackSettings.model_fields[name]))
    assert alike == [], "declare these once, in bridge.service.settings_loader.ServiceSettings"
    assert {"http_port", "max_body_bytes"} <= both  # the walk sees them


def test_a_status_is_chosen_only_by_status_for() -> None:
    """A raise site names what went wrong (a class of bridge.errors); the number it is
    answered with is bridge.http.error_boundary.status_for's choice, so the same refusal cannot be
    a 400 in one app and a 422 in another."""
    from bridge import errors
    refusals = {name for name, obj in vars(errors).items()
                if isinstance(obj, type) and issubclass(obj, errors.InputError)}
    wrong = []
    for package in PACKAGES:
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and ast.unparse(node.func) in refusals
                        and any(k.arg == "status" for k in node.keywords)):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert wrong == []
    assert "status" not in inspect.signature(errors.InputError).parameters


def test_every_refusal_is_drawn_in_the_tree_and_has_its_status() -> None:
    from bridge import errors
    from bridge.http.error_boundary import status_for
    tree = (errors.__doc__ or "").split("\n\n")[1]
    expected = {"MalformedBodyError": 400, "AuthError": 401, "ForbiddenError": 403,
                "NotFoundError": 404, "ConflictError": 409, "BodyTooLargeError": 413,
                "RateLimitedError": 429, "CapacityError": 503, "InputError": 422,
                "OutboundRefusedError": 422}
    for name, obj in vars(errors).items():
        if isinstance(obj, type) and issubclass(obj, errors.FleetError):
            assert re.search(rf"\b{name}\b", tree), f"{name} is not drawn in bridge/errors.py"
    for name, status in expected.items():
        cls = getattr(errors, name)
        exc = cls("x", host="h") if name == "OutboundRefusedError" else cls("x")
        assert status_for(exc) == status, name
        assert re.search(rf"{name}\b.*\b{status}$", tree, re.M), f"{name}'s {status} not drawn"


# What an application imports, as the README and docs/ show it; bridge/__init__.py's
# __all__ lists exactly these, so moving a module cannot silently break a user's import.
PUBLIC = {"FleetClient", "Subscription", "verify_signature", "errors", "transport", "compat"}


def test_what_users_import_is_declared_and_importable() -> None:
    import bridge
    assert set(bridge.__all__) == PUBLIC
    shown = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for module, names in re.findall(r"from (bridge[\w.]*) import ([\w, ]+)",
                                        doc.read_text(encoding="utf-8")):
            shown |= {(module, n.strip()) for n in names.split(",") if n.strip()}
    assert ("bridge", "FleetClient") in shown and ("bridge.compat", "MQTTProxy") in shown
    for module, name in shown:
        promised = name in PUBLIC if module == "bridge" else module.split(".")[1] in PUBLIC
        assert promised, \
            f"docs show `from {module} import {name}`, which bridge.__all__ does not promise"
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_the_public_names_are_what_bridge_gives() -> None:
    """``from bridge import FleetClient, verify_signature`` and ``bridge.errors``,
    ``bridge.transport``, ``bridge.compat`` (the modules themselves) keep working however
    the modules behind them move."""
    import bridge
    for name in bridge.__all__:
        assert getattr(bridge, name, None) is not None, f"bridge.{name}"
    for name in ("errors", "transport", "compat"):
        assert getattr(bridge, name) is importlib.import_module(f"bridge.{name}")


def test_a_service_loads_no_http_client_it_does_not_use() -> None:
    """The edge agent and the callback server start without httpx (and the rich and
    pygments its command line brings): ``import bridge`` once loaded them all, ~5 MiB of a
    gateway's idle memory. The client is loaded by the code that sends a request."""
    code = ("import sys, edge_agent.service, edge_agent.cli, callback_server.app, "
            "callback_server.cli, bridge; print(sorted(m for m in ('httpx', 'rich', "
            "'pygments') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout.strip()
    assert loaded == "[]"


# bridge/ by axis (docs/architecture.md, "Layout"): the MQTT nouns, the exception tree,
# what applications import and what both axes use stay at the top; HTTP lives in
# bridge/http/ and a process's life in bridge/service/. A new module picks its axis.
TOP_LEVEL = {"backoff", "client", "clock", "commands", "compat", "embedded_broker",
             "envelope", "errors", "frames", "router", "signature", "strictjson", "topic"}


def test_bridge_is_laid_out_by_axis() -> None:
    flat = {p.stem for p in (ROOT / "bridge").glob("*.py")} - {"__init__"}
    assert flat - TOP_LEVEL == set(), "put it in bridge/http/, bridge/service/ or a noun's package"
    for axis in ("http", "service"):
        assert (ROOT / "bridge" / axis / "__init__.py").is_file()
        assert ast.get_docstring(ast.parse((ROOT / "bridge" / axis / "__init__.py")
                                           .read_text(encoding="utf-8"))), axis


# Documents that live outside the repository (the team's notes): a comment citing one
# sends a reader nowhere. What the code needs of them is in docs/.
OUTSIDE = re.compile(r"\b(?:DESIGN|MEASURED|PUDU|PUDU-API|SEEDS|STYLE)\.md\b|\.\./shared\b|/work/")
CITED_DOC = re.compile(r"\bdocs/([\w-]+\.md)\b")


def _texts() -> Iterator[Path]:
    for top in (*PACKAGES, "tests", "bench"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".md", ".yaml", ".yml", ".sh", ".js", ".html"):
                yield path
    yield from (ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml")
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield from sorted((ROOT / "systemd").rglob("*"))


def test_no_comment_points_outside_the_repository() -> None:
    outside, missing = [], []
    for path in _texts():
        if not path.is_file() or path == Path(__file__):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                 .splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            if OUTSIDE.search(line):
                outside.append(f"{where}: {line.strip()}")
            missing += [f"{where}: docs/{name}" for name in CITED_DOC.findall(line)
                        if not (ROOT / "docs" / name).is_file()]
    assert outside == [], "cite the docs/ page that holds it instead"
    assert missing == []


def _module_graph() -> dict[str, set[str]]:
    """Every module of the packages -> the modules of ours it imports (at any depth in
    the file, TYPE_CHECKING blocks included: a circle there is still a circle to read)."""
    files = {}
    for package in PACKAGES:
        for path in modules(package):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def ours(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" \
                        else name.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join([*here, *([node.module] if node.module else [])])
                targets += [f"{base}.{alias.name}" for alias in node.names]
        found = {m for t in targets if (m := ours(t)) is not None}
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: a package's modules
        # are imported through it, so a circle between packages is one (webhooks ->
        # alerts -> webhooks was, though no two modules imported each other), except
        # through the packages that hold the importer (Python has them half-run already).
        graph[name] = {p for m in found for p in (*_packages_of(m, files), m)
                       if p != name and not (name + ".").startswith(p + ".")}
    return graph


def _packages_of(module: str, files: dict[str, Path]) -> list[str]:
    """The packages (with an ``__init__``) that importing ``module`` runs first."""
    parts = module.split(".")
    return [p for i in range(1, len(parts)) if (p := ".".join(parts[:i])) in files
            and files[p].name == "__init__.py"]


def test_no_import_circles() -> None:
    graph = _module_graph()
    assert "bridge.http.outbound_transport" in graph["bridge.http.outbound"]  # the walk sees inside
    circles = []
    for start in sorted(graph):  # a path from a module's imports back to the module
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name == start:
                circles.append(start)
                break
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
    assert circles == [], "these modules import themselves through others"


def _packages() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).parent.parts) for package in PACKAGES
                  for p in (ROOT / package).rglob("__init__.py"))


@pytest.mark.parametrize("package", _packages())
def test_each_package_imports_first_in_a_fresh_interpreter(package: str) -> None:
    """The way a user (or ``python -m``) meets a package: imported first, before any
    other of ours; a circle through packages raises ImportError here and only here."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]

# -- routes you can find ----------------------------------------------------------------------
ROUTE_METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "api_route"}
#: Longest a route function may be (its ``def`` to its last line, decorators aside).
ROUTE_MAX_LINES = 30
#: Where a caller's role is checked: the rules and the dependencies built on them.
ROLE_HOME = ROOT / "callback_server" / "access.py"


def _is_route(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
        isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
        and d.func.attr in ROUTE_METHODS for d in node.decorator_list)


def _routes() -> Iterator[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    """(file, route function, whether it is defined at module level) of every route."""
    for package in PACKAGES:
        for path in modules(package):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top = set(tree.body)
            for node in ast.walk(tree):
                if _is_route(node):
                    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    yield path, node, node in top


def test_routes_are_module_level_functions() -> None:
    routes = list(_routes())
    assert len(routes) > 40  # the walk finds them (all three apps)
    nested = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
              for path, node, top in routes if not top]
    assert nested == [], "a route inside a factory: make it a top-level function of a " \
                         "module-level APIRouter that gets what it needs via Depends"


def test_routes_are_short() -> None:
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
            f"{(node.end_lineno or node.lineno) - node.lineno + 1} lines"
            for path, node, _ in _routes()
            if (node.end_lineno or node.lineno) - node.lineno + 1 > ROUTE_MAX_LINES]
    assert long == [], "move the logic into the module that owns it"


def test_routes_touch_no_private_member_of_another_object() -> None:
    touched = [f"{path.relative_to(ROOT)}:{n.lineno} {node.name}: .{n.attr}"
               for path, node, _ in _routes() for n in ast.walk(node)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert touched == [], "give the owner a public method"


def test_roles_are_checked_only_by_the_dependencies() -> None:
    calls = []
    for package in PACKAGES:
        for path in modules(package):
            if path == ROLE_HOME:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "require_role":
                    calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == [], "take the caller as Reader / Operator / Admin / Ingester " \
                        "(callback_server.access) instead"


#: Where the edge's admin listener reads its token: the one dependency both the REST MQTT
#: proxy and the ``/pudu/*`` routes take (``ListenerToken``).
TOKEN_HOME = ROOT / "bridge" / "proxy" / "http.py"


def _reads_authorization(node: ast.AST) -> bool:
    """A server reading ``Authorization`` itself: a ``.get("authorization")`` on headers,
    a parameter named ``authorization``, or a FastAPI ``Header(...)`` parameter."""
    if isinstance(node, ast.arg):
        return node.arg.lower() == "authorization"
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else \
        func.id if isinstance(func, ast.Name) else ""
    if name == "Header":
        return True
    return name == "get" and bool(node.args) and isinstance(node.args[0], ast.Constant) \
        and str(node.args[0].value).lower() == "authorization"


def test_the_edge_checks_its_token_only_in_the_one_dependency() -> None:
    """The proxy and /pudu/* once checked the token each their own way (a bare token was
    let in by one, a lower-case ``bearer`` by the other): the edge side reads the header
    in one place."""
    found = []
    for package in ("bridge", "edge_agent"):
        for path in modules(package):
            if path == TOKEN_HOME:
                continue
            found += [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if _reads_authorization(node)]
    assert found == [], "take the caller as ListenerToken (bridge.proxy.http) instead"


#: Where the callback server reads ``Authorization``: its access rules (``Access``), which
#: every route's caller dependency and the health route's detail check go through.
CLOUD_TOKEN_HOME = ROOT / "callback_server" / "access.py"


def test_the_cloud_reads_the_authorization_header_only_in_its_access_rules() -> None:
    """/callback/health once split ``Authorization`` itself to decide whether to show its
    figures: a second bearer parser that could let in what the routes refuse."""
    found = []
    for path in modules("callback_server"):
        if path == CLOUD_TOKEN_HOME:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno}"
                  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                  if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes)
                  and (node.value.decode("latin-1") if isinstance(node.value, bytes)
                       else node.value).lower() == "authorization"]
    assert found == [], "ask callback_server.access (Access.bearer_principal, Caller, ...)"


#: Basenames more than one package has, each the same part of its package (the spine of a
#: service, a package's store, schema, routes, ...). Any other repeat is a name that means
#: two things: ``client.py`` was the FleetClient and the Pudu API's client, and
#: ``subscriptions.py`` the proxy's and the alerts' subscriptions.
SAME_PART = {"__init__", "__main__", "settings", "service", "cli", "config_checks", "metrics",
             "ports", "routes", "store", "schema", "delivery", "core", "base", "admin"}


def test_no_basename_means_two_things() -> None:
    seen: dict[str, list[str]] = {}
    for package in ("bridge", "edge_agent", "callback_server"):
        for path in modules(package):
            seen.setdefault(path.stem, []).append(str(path.relative_to(ROOT)))
    repeated = {name: paths for name, paths in seen.items()
                if len(paths) > 1 and name not in SAME_PART}
    assert repeated == {}, "name the module for what it owns"
    assert len(seen["settings"]) > 1  # the walk sees every package
