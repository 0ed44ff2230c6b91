"""Sphinx extension: the picture of one handler's topology, drawn from the code.

``.. handler-topology::`` runs the library's own topology code
(:mod:`domain_event_broker._subscribing.topology`, which takes its names from
:mod:`domain_event_broker._amqp.names`) against a channel that only records what
it is asked to declare, and draws what was recorded as an inline SVG: the
exchanges and queues with their arguments, the bindings, the queues'
dead-letter exchanges, and the routes the worker publishes retries and dead
letters on. When the topology code changes, the picture follows at the next
``make docs``; when its functions change signature, the build fails.

Options: ``:name:`` (handler name, default ``welcome-email``),
``:binding-keys:`` (comma-separated, default ``user.registered``),
``:delays:`` (retry delays in seconds, comma-separated, default ``10``),
``:no-dead-letter:`` (draw a handler registered without ``dead_letter``).

No Graphviz: the layout is a few lines of Python below, so ``make docs``
needs nothing beyond Sphinx.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from types import SimpleNamespace
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from domain_event_broker._amqp import names as _names
from domain_event_broker._subscribing import topology as _topology
from domain_event_broker._subscribing.registration import Registration

PUBLISHER = "application"
HANDLER = "handler"


# -- recording what the topology code declares ---------------------------------------------


@dataclass
class Declared:
    """One exchange or queue, as the topology code declared it."""

    name: str
    kind: str  # "exchange" or "queue"
    options: dict[str, Any] = field(default_factory=dict)
    arguments: dict[str, Any] = field(default_factory=dict)


class RecordingChannel:
    """Stands in for a pika channel: records declarations and bindings.

    Only the calls the topology code makes are accepted; anything else
    fails the docs build, so that a new kind of broker call gets drawn
    rather than silently left out.
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Declared] = {}
        self.bindings: list[tuple[str, str, str]] = []  # (exchange, destination, key)

    def _declare(self, kind: str, name: str, options: dict[str, Any], arguments: Any) -> None:
        declared = self.objects.setdefault((kind, name), Declared(name, kind))
        declared.options.update(options)
        declared.arguments.update(dict(arguments or {}))

    def exchange_declare(
        self,
        exchange: str,
        exchange_type: Any = "direct",
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        kind = getattr(exchange_type, "value", exchange_type)
        options = {"type": str(kind), "durable": durable, "auto_delete": auto_delete}
        self._declare("exchange", exchange, options, arguments)

    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        options = {"durable": durable, "exclusive": exclusive, "auto_delete": auto_delete}
        self._declare("queue", queue, options, arguments)

    def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self.bindings.append((exchange, queue, routing_key or ""))

    def exchange_bind(
        self,
        destination: str,
        source: str,
        routing_key: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self.bindings.append((source, destination, routing_key))

    @property
    def connection(self) -> _RecordingConnection:
        """Short-lived probe channels are opened on the channel's connection."""
        return _RecordingConnection(self)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the topology picture does not know the channel method {name!r}: "
            f"teach docs/_ext/topology.py to draw it"
        )


class _RecordingConnection:
    def __init__(self, recorder: RecordingChannel) -> None:
        self._recorder = recorder

    def channel(self) -> _ProbeChannel:
        return _ProbeChannel(self._recorder)


class _ProbeChannel:
    """A probe channel: its first declaration of a queue is the declaration;
    passive declarations and later probes (asking a queue's type) draw nothing."""

    #: Never closed by the broker: every probe finds what it asks about.
    is_open = True

    def __init__(self, recorder: RecordingChannel) -> None:
        self._recorder = recorder

    def queue_declare(self, queue: str, passive: bool = False, **kwargs: Any) -> Any:
        # What a passive declaration answers (_amqp/probes reads the counts).
        found = SimpleNamespace(method=SimpleNamespace(message_count=0, consumer_count=0))
        if passive or ("queue", queue) in self._recorder.objects:
            return found
        self._recorder.queue_declare(queue, **kwargs)
        return found

    def close(self) -> None:
        pass


# -- the graph ----------------------------------------------------------------------------


@dataclass
class Node:
    key: str
    kind: str  # "exchange", "queue" or "process"
    title: str
    detail: str


@dataclass
class Edge:
    source: str
    target: str
    label: str
    style: str  # "flow", "retry", "dead-letter", "replay"


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def add_edge(self, source: str, target: str, label: str, style: str) -> None:
        for edge in self.edges:
            if (edge.source, edge.target, edge.style) == (source, target, style):
                if label not in edge.label.split(", "):
                    edge.label += f", {label}"
                return
        self.edges.append(Edge(source, target, label, style))


def _seconds(milliseconds: Any) -> str:
    return f"{int(milliseconds) / 1000:g} s"


def _detail(declared: Declared) -> str:
    options, arguments = declared.options, declared.arguments
    words = []
    if declared.kind == "exchange":
        words.append(f"{options.get('type', 'direct')} exchange")
    else:
        words.append(str(arguments.get("x-queue-type", "queue")))
        if words[0] != "queue":
            words[0] += " queue"
    words.append("durable" if options.get("durable") else "transient")
    if options.get("auto_delete"):
        words.append("auto-delete")
    if options.get("exclusive"):
        words.append("exclusive")
    if "x-message-ttl" in arguments:
        words.append(f"TTL {_seconds(arguments['x-message-ttl'])}")
    if "x-expires" in arguments:
        words.append(f"expires {_seconds(arguments['x-expires'])}")
    if "x-delivery-limit" in arguments:
        words.append(f"delivery limit {arguments['x-delivery-limit']}")
    return ", ".join(words)


def _node_for(exchange: str, routing_key: str) -> str:
    """Where a publish to ``exchange`` with ``routing_key`` lands: the default
    exchange ``""`` delivers straight to the queue named by the key."""
    return f"queue:{routing_key}" if exchange == "" else f"exchange:{exchange}"


def handler_graph(
    name: str, binding_keys: Sequence[str], delays: Sequence[float], dead_letter: bool
) -> Graph:
    """Run the topology code for one handler and turn what it declared into a graph."""
    registration = Registration(
        handler=lambda event: None,
        name=name,
        binding_keys=tuple(binding_keys),
        dead_letter=dead_letter,
    )
    exchange, exchange_type = _names.DEFAULT_EXCHANGE, _names.DEFAULT_EXCHANGE_TYPE
    channel = RecordingChannel()
    _topology.declare_handler(channel, registration, exchange, exchange_type)
    retry_routes = [
        (
            delay,
            _topology.declare_delay(channel, registration, _names.delay_ms(delay), exchange_type),
        )
        for delay in delays
    ]
    dead_letter_route = _topology.dead_letter_route(registration) if dead_letter else None

    graph = Graph()
    graph.nodes[PUBLISHER] = Node(PUBLISHER, "process", "publish_domain_event()", "any service")
    graph.nodes[f"exchange:{exchange}"] = Node(f"exchange:{exchange}", "exchange", exchange, "")
    for declared in channel.objects.values():
        key = f"{declared.kind}:{declared.name}"
        graph.nodes[key] = Node(key, declared.kind, declared.name, _detail(declared))
    graph.nodes[HANDLER] = Node(HANDLER, "process", "the handler", f"a worker consuming {name}")

    graph.add_edge(PUBLISHER, f"exchange:{exchange}", "publish", "flow")
    for source, destination, routing_key in channel.bindings:
        target = (
            f"queue:{destination}"
            if ("queue", destination) in channel.objects
            else f"exchange:{destination}"
        )
        graph.add_edge(f"exchange:{source}", target, routing_key or '""', "flow")
    graph.add_edge(f"queue:{name}", HANDLER, "deliver; ack when it returns", "flow")
    for delay, (route_exchange, route_key) in retry_routes:
        graph.add_edge(
            HANDLER,
            _node_for(route_exchange, route_key),
            f"raise Retry({delay:g})",
            "retry",
        )
    if dead_letter_route is not None:
        graph.add_edge(
            HANDLER,
            _node_for(*dead_letter_route),
            "exception, or Retry past max_retries",
            "dead-letter",
        )
    for declared in channel.objects.values():
        if declared.kind != "queue" or "x-dead-letter-exchange" not in declared.arguments:
            continue
        target = _node_for(
            str(declared.arguments["x-dead-letter-exchange"]),
            str(declared.arguments.get("x-dead-letter-routing-key", "")),
        )
        if "x-message-ttl" in declared.arguments:
            label, style = f"after {_seconds(declared.arguments['x-message-ttl'])}", "retry"
        else:
            label, style = "rejected or over its delivery limit", "dead-letter"
        graph.add_edge(f"queue:{declared.name}", target, label, style)
    dead_letters = f"queue:{_names.dead_letter_queue(name)}"
    if dead_letters in graph.nodes:
        graph.add_edge(
            dead_letters, f"exchange:{_names.retry_exchange(name)}", "replay (operator)", "replay"
        )
    for edge in graph.edges:
        for end in (edge.source, edge.target):
            if end not in graph.nodes:  # e.g. a route to an undeclared exchange
                kind, _, title = end.partition(":")
                graph.nodes[end] = Node(end, kind, title, "not declared by the handler")
    return graph


# -- layout and drawing -------------------------------------------------------------------

NODE_WIDTH = 250
NODE_HEIGHT = 46
COLUMN = 300
ROW = 96
LEFT = 20
TOP = 20
GUTTER = 210  # right of the grid: room for the edges that go back up

COLOURS: Mapping[str, tuple[str, str]] = {
    "exchange": ("#fdebd0", "#b9770e"),
    "queue": ("#d6eaf8", "#1f618d"),
    "process": ("#f2f3f4", "#616a6b"),
}
#: Labels get a white outline, so that they stay readable across lines.
HALO: Mapping[str, Any] = {
    "stroke": "white",
    "stroke_width": 4,
    "paint_order": "stroke",
    "stroke_linejoin": "round",
}
EDGE_COLOURS: Mapping[str, str] = {
    "flow": "#34495e",
    "retry": "#b9770e",
    "dead-letter": "#c0392b",
    "replay": "#1e8449",
}


def layout(graph: Graph) -> dict[str, tuple[int, int]]:
    """(row, column) of every node.

    Edges that close a cycle (found depth first from the publisher) are set
    aside; every other edge points down: a node's row is the longest path
    to it from the publisher. Within a row, nodes keep the order the depth
    first walk reached them in. Nodes nothing reaches go last.
    """
    successors: dict[str, list[str]] = {key: [] for key in graph.nodes}
    for edge in graph.edges:
        successors[edge.source].append(edge.target)
    order: list[str] = []
    forward: dict[str, list[str]] = {key: [] for key in graph.nodes}
    on_path: set[str] = set()

    def visit(key: str) -> None:
        order.append(key)
        on_path.add(key)
        for target in successors[key]:
            if target in on_path:
                continue  # closes a cycle: drawn as an edge back up
            forward[key].append(target)
            if target not in order:
                visit(target)
        on_path.discard(key)

    visit(PUBLISHER)
    reached = len(order)
    order += [key for key in graph.nodes if key not in order]
    row = dict.fromkeys(order, 0)
    for _ in order:  # relax: longest paths in a graph without cycles
        for key in order:
            for target in forward[key]:
                row[target] = max(row[target], row[key] + 1)
    last = max(row.values()) + 1
    for key in order[reached:]:
        row[key] = last
    positions: dict[str, tuple[int, int]] = {}
    used: dict[int, int] = {}
    for key in order:
        positions[key] = (row[key], used.get(row[key], 0))
        used[row[key]] = used.get(row[key], 0) + 1
    return positions


class Svg:
    """A small SVG writer (no dependencies)."""

    MARKERS: ClassVar[str] = "".join(
        f'<marker id="arrow-{style}" viewBox="0 0 10 10" refX="10" refY="5" '
        f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        f'<path d="M 0 0 L 10 5 L 0 10 z" fill="{colour}"/></marker>'
        for style, colour in EDGE_COLOURS.items()
    )

    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self, x: float, y: float, content: str, **attributes: Any) -> None:
        attrs = " ".join(f'{key.replace("_", "-")}="{value}"' for key, value in attributes.items())
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" {attrs}>{escape(content)}</text>')


def _anchor(box: tuple[float, float], toward: tuple[float, float]) -> tuple[float, float]:
    """The point on a node's border on the way from its centre to ``toward``."""
    (x, y), (tx, ty) = box, toward
    dx, dy = tx - x, ty - y
    if dx == 0 and dy == 0:
        return x, y
    scale = min(
        (NODE_WIDTH / 2) / abs(dx) if dx else math.inf,
        (NODE_HEIGHT / 2) / abs(dy) if dy else math.inf,
    )
    return x + dx * scale, y + dy * scale


def render(graph: Graph, title: str) -> str:
    """The graph as a standalone ``<svg>`` element."""
    positions = layout(graph)
    rows = max(row for row, _ in positions.values()) + 1
    columns = max(column for _, column in positions.values()) + 1
    width = LEFT + columns * COLUMN + GUTTER
    height = TOP + rows * ROW + 80

    def centre(key: str) -> tuple[float, float]:
        row, column = positions[key]
        return LEFT + column * COLUMN + NODE_WIDTH / 2, TOP + row * ROW + NODE_HEIGHT / 2

    svg = Svg()
    labels = Svg()  # drawn last, over every line
    gutter_x = LEFT + columns * COLUMN - 20
    back_edges = 0
    for edge in graph.edges:
        colour = EDGE_COLOURS[edge.style]
        start, end = centre(edge.source), centre(edge.target)
        dash = ' stroke-dasharray="6 4"' if edge.style in {"replay", "dead-letter"} else ""
        marker = f'marker-end="url(#arrow-{edge.style})"'
        if positions[edge.target][0] <= positions[edge.source][0]:
            # Back up (or sideways): around the right of the grid.
            back_edges += 1
            out_x = gutter_x + 14 * back_edges
            x1, y1 = start[0] + NODE_WIDTH / 2, start[1]
            x2, y2 = end[0] + NODE_WIDTH / 2, end[1]
            path = f"M {x1:.1f} {y1:.1f} H {out_x:.1f} V {y2:.1f} H {x2:.1f}"
            svg.parts.append(
                f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.6"'
                f"{dash} {marker}/>"
            )
            labels.text(out_x + 6, (y1 + y2) / 2, edge.label, fill=colour, font_size=11, **HALO)
            continue
        x1, y1 = _anchor(start, end)
        x2, y2 = _anchor(end, start)
        svg.parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{colour}" stroke-width="1.6"{dash} {marker}/>'
        )
        # Straight down: the label beside the middle; slanted: beside the
        # first third, so that labels of crossing edges stay apart.
        share = 0.5 if abs(x2 - x1) < 1 else 0.3
        label_x, label_y = x1 + (x2 - x1) * share + 6, y1 + (y2 - y1) * share + 4
        labels.text(label_x, label_y, edge.label, fill=colour, font_size=11, **HALO)
    for key, node in graph.nodes.items():
        x, y = centre(key)
        fill, stroke = COLOURS.get(node.kind, COLOURS["process"])
        radius = 22 if node.kind == "exchange" else 4
        dash = ' stroke-dasharray="4 3"' if node.kind == "process" else ""
        svg.parts.append(
            f'<rect x="{x - NODE_WIDTH / 2:.1f}" y="{y - NODE_HEIGHT / 2:.1f}" '
            f'width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="{radius}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.4"{dash}/>'
        )
        font = "monospace" if node.kind != "process" else "sans-serif"
        svg.text(
            x,
            y - 3,
            node.title,
            text_anchor="middle",
            font_size=13,
            font_family=font,
            fill="#17202a",
        )
        svg.text(x, y + 14, node.detail, text_anchor="middle", font_size=10, fill="#566573")
    svg.parts += labels.parts
    legend_y = TOP + rows * ROW + 20
    legend = [
        ("flow", "routing and delivery"),
        ("retry", "delayed retry"),
        ("dead-letter", "dead-lettering"),
        ("replay", "replay"),
    ]
    for index, (style, text) in enumerate(legend):
        lx = LEFT + index * 170
        svg.parts.append(
            f'<line x1="{lx}" y1="{legend_y}" x2="{lx + 30}" y2="{legend_y}" '
            f'stroke="{EDGE_COLOURS[style]}" stroke-width="2" marker-end="url(#arrow-{style})"/>'
        )
        svg.text(lx + 36, legend_y + 4, text, font_size=11, fill="#17202a")
    for index, text in enumerate(["rounded: exchange", "square: queue", "dashed: process"]):
        svg.text(LEFT + index * 170, legend_y + 30, text, font_size=11, fill="#566573")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(title)}" '
        f'font-family="sans-serif"><title>{escape(title)}</title>'
        f"<defs>{Svg.MARKERS}</defs>{''.join(svg.parts)}</svg>"
    )


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class HandlerTopology(SphinxDirective):
    """``.. handler-topology::`` draws one handler's exchanges and queues."""

    has_content = False
    option_spec: ClassVar[dict[str, Any]] = {
        "name": directives.unchanged,
        "binding-keys": directives.unchanged,
        "delays": directives.unchanged,
        "no-dead-letter": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        name = self.options.get("name", "welcome-email")
        keys = _list(self.options.get("binding-keys", "user.registered"))
        delays = [float(delay) for delay in _list(self.options.get("delays", "10"))]
        dead_letter = "no-dead-letter" not in self.options
        graph = handler_graph(name, keys, delays, dead_letter)
        title = f"The exchanges and queues of handler {name}"
        svg = render(graph, title)
        html = f'<figure class="handler-topology">{svg}</figure>'
        return [nodes.raw("", html, format="html")]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("handler-topology", HandlerTopology)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
