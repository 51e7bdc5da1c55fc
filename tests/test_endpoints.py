"""Client and trainer agree on the set of endpoints: the one table in
`firetitan._wire.endpoints` names every path, the trainer serves each endpoint with a
handler, and the client core calls each endpoint that it is marked as calling."""

from __future__ import annotations

import ast
from pathlib import Path

from firetitan._wire import endpoints
from firetitan.local.checkpoints import CheckpointStore
from firetitan.local.config import ServerConfig
from firetitan.local.null_engine import NullEngine
from firetitan.local.server import TrainerServer

PACKAGE = Path(__file__).resolve().parents[1] / "firetitan"
TABLE = PACKAGE / "_wire" / "endpoints.py"


def _server(tmp_path: Path, *, debug: bool) -> TrainerServer:
    store = CheckpointStore(tmp_path, "job")
    return TrainerServer(NullEngine, store, "key", ServerConfig(debug_endpoints=debug))


def test_every_endpoint_has_a_handler_and_a_route(tmp_path: Path) -> None:
    server = _server(tmp_path, debug=True)
    assert set(server.handlers()) == {e.name for e in endpoints.TRAINER}
    routes = {
        (route.method, route.resource.canonical)
        for route in server.make_app().router.routes()
        if route.resource is not None
    }
    assert routes == {(e.method, e.path) for e in endpoints.TRAINER}
    plain = _server(tmp_path, debug=False).make_app().router.routes()
    assert endpoints.DEBUG_EXECUTION_LOG.path not in {
        r.resource.canonical for r in plain if r.resource
    }


def _table_names_used(directory: Path) -> set[str]:
    """The table's constants that the modules under ``directory`` reference as
    ``endpoints.NAME``."""
    used: set[str] = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "endpoints"
            ):
                used.add(node.attr)
    return used


def _constant(endpoint: endpoints.Endpoint) -> str:
    return next(k for k, v in vars(endpoints).items() if v is endpoint)


def test_the_client_calls_each_client_endpoint_through_the_table() -> None:
    used = _table_names_used(PACKAGE / "_async")
    called = {e.name for e in endpoints.ALL if _constant(e) in used}
    # forward and forward_backward are picked by name (endpoints.BY_NAME[kind]).
    called |= {"forward", "forward_backward"} if "BY_NAME" in used else set()
    assert called == {e.name for e in endpoints.ALL if e.client}


def test_paths_are_named_only_in_the_table() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == TABLE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            text = node.value if isinstance(node, ast.Constant) else None
            if isinstance(text, str) and any(e.path in text for e in endpoints.ALL):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_ordered_endpoints_are_futures_with_a_request_type() -> None:
    for endpoint in endpoints.ALL:
        if endpoint.ordered:
            assert endpoint.future and endpoint.method == "POST"
        assert bool(endpoint.request_type) == endpoint.future, endpoint.name
        if endpoint.server == "trainer":
            assert endpoint.path.startswith(endpoints.API_PREFIX + "/")
    assert len({(e.method, e.path) for e in endpoints.ALL}) == len(endpoints.ALL)
    assert len(endpoints.BY_NAME) == len(endpoints.ALL)
