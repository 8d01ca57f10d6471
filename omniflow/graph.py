"""Graph files: YAML -> typed `Graph`, validated before anything starts.

    nodes:
      src:
        use: nodes.audio:FileSource            # any importable Node class
        params: {path: in.wav, rate: 16000}
      gain:
        use: nodes.dsp:Gain
        params: {db: -6}
        inputs: {audio: src/audio}             # port: "node/port"
        restart: on-failure                    # never | on-failure | always (default: never;
                                               # on-failure in a graph that serves clients)
        host: 10.0.0.2:47100                   # optional: outputs bind tcp on this host, ports
                                               # 47100, 47101, ... (no port: free ports, one machine)
        resources: {num_cpus: 1, num_gpus: 1}  # optional: what Ray / Kubernetes reserve for it
        threads: 1                             # optional: CPU threads for the node's math (torch,
                                               # OpenMP, MKL); default: the launcher's CPU plan
      sink:
        use: nodes.audio:WavSink
        params: {path: out.wav}
        inputs:
          audio: {from: gain/audio, policy: lossless, depth: 64}

An input may also list several sources (fan-in: `[a/x, b/y]`). An output feeding several
consumers delivers every frame to each (fan-out). A loop is an error unless one of its edges says
`feedback: true`.

`threads: N` matters when several compute-heavy nodes share few cores: torch, OpenMP and MKL each
default to one thread per core, so two such nodes (e.g. whisper and the backbone on 2 cores)
oversubscribe the CPU and both slow down. Without it the local launcher follows its CPU plan
(omniflow.launch.plan: light nodes 1 thread, heavy ones a share of the cores). The runtime applies it in the node's process before
`setup()`: torch.set_num_threads(N) if torch is loaded, and OMP_NUM_THREADS / MKL_NUM_THREADS /
OPENBLAS_NUM_THREADS for a node process the local launcher starts (read when torch loads later).
In an in-process run (`--in-process`, nodes on threads) the setting is process-wide: the last
node to start wins.

Graph variables set one value in several nodes: a top-level `vars:` mapping declares them with
their defaults, a param value `${name}` takes the variable (its type too), and `--set name=value`
(no dot) overrides it — `--set checkpoint=runs/final` gives every node that reads `${checkpoint}`
the same checkpoint. `--set node.param=value` still sets one node's param, after the variables.

    vars:
      checkpoint: null                         # Mini-Omni weights; null: the cache
    nodes:
      backbone: {use: nodes.backbone:Backbone, params: {checkpoint: ${checkpoint}}}

`use:` modules are imported from sys.path, then from the graph file's own directory, so a node
class written next to the graph needs no PYTHONPATH (node processes get the same directories).

Every problem is reported as `file:line: what is wrong. Fix: what to do`,
all of them at once, in a `GraphError`.
"""
from __future__ import annotations

import difflib
import importlib
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import yaml
from yaml.constructor import SafeConstructor

from .frame import KINDS

NODE_KEYS = {"use", "params", "inputs", "restart", "max_restarts", "backoff_s", "host", "resources",
             "threads"}
EDGE_KEYS = {"from", "policy", "depth", "feedback"}
TOP_KEYS = {"nodes", "description", "vars"}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")   # ${name} in a param value
# directories of the graph files loaded in this process, appended to sys.path so their `use:`
# modules import; the launcher hands them to node processes (runtime.NodeConfig.sys_path)
GRAPH_DIRS: list[str] = []
RESTART_POLICIES = ("never", "on-failure", "always")
SERVED_RESTART = "on-failure"   # the default of every node in a graph with a server (a Node with `listen`)
QUEUE_POLICIES = ("lossless", "drop-oldest")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
DEFAULT_DEPTH = 64           # frames buffered at each end of an edge before the producer blocks


class GraphError(ValueError):
    """A graph file has problems; `errors` lists every one, each naming file, line and fix."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class Edge(msgspec.Struct, frozen=True):
    src: str                 # producing node
    src_port: str
    dst: str                 # consuming node
    dst_port: str
    kind: str = "any"        # frame kind the producer declares on src_port
    policy: str = "lossless"
    depth: int = DEFAULT_DEPTH
    feedback: bool = False   # closes a loop on purpose; not waited on for end of stream
    line: int = 0            # where the graph file declares it, for error messages

    @property
    def id(self) -> str:
        return f"{self.src}/{self.src_port}->{self.dst}/{self.dst_port}"


class NodeSpec(msgspec.Struct):
    name: str
    use: str                 # "module:Class"
    params: dict[str, Any]   # plain data, already validated against the class's Params
    restart: str = "never"
    max_restarts: int = 3
    backoff_s: float = 0.5
    host: str | None = None  # producers on this node bind tcp:// on this host instead of ipc://
                             # ("HOST" or "HOST:PORT_BASE", see split_host)
    resources: dict[str, float] = {}   # num_cpus, num_gpus, memory (bytes), custom: for Ray / k8s
    threads: int | None = None         # CPU threads for torch/OpenMP/MKL in this node; None: theirs
    line: int = 0


class Graph(msgspec.Struct):
    path: str
    nodes: dict[str, NodeSpec]
    edges: list[Edge]

    def inputs_of(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == name]

    def outputs_of(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.src == name]


def import_class(use: str) -> type:
    module, _, attr = use.partition(":")
    if not module or not attr:
        raise ValueError(f"'use: {use}' must look like 'package.module:ClassName'")
    return getattr(importlib.import_module(module), attr)


# --- loading ---------------------------------------------------------------------------------

def add_import_dir(folder: str | Path) -> None:
    """Let `use:` modules (and node processes) import from `folder`, after everything on sys.path."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.append(folder)
    if folder not in GRAPH_DIRS:
        GRAPH_DIRS.append(folder)


def load_graph(path: str | Path, overrides: list[str] | None = None) -> Graph:
    """Read and validate a graph file. `overrides` are `node.param=value` (or `var=value`)
    strings (CLI --set)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise GraphError([f"{path}: cannot read graph file ({e.strerror}). "
                          "Fix: check the path"]) from None
    add_import_dir(path.parent)
    return parse_graph(text, str(path), overrides or [])


def parse_graph(text: str, path: str = "<graph>", overrides: list[str] = ()) -> Graph:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise GraphError([f"{where}: not valid YAML ({getattr(e, 'problem', e)}). "
                          "Fix: check indentation and quoting"]) from None
    return _Parser(path).parse(root, list(overrides))


def _plain(node: yaml.Node) -> Any:
    return SafeConstructor().construct_document(node)


def _items(node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """key -> (key node, value node), keeping the marks for error lines."""
    return {str(_plain(k)): (k, v) for k, v in node.value}


def _type_name(t: Any) -> str:
    """A param's type as a graph author writes its value: str, int | None, 'torch' | 'onnx',
    float in (0, 1)."""
    if t is type(None):
        return "None"
    if get_origin(t) is Annotated:
        base, *metas = get_args(t)
        bounds = [_bounds(m) for m in metas if isinstance(m, msgspec.Meta)]
        return " ".join([_type_name(base), *[b for b in bounds if b]])
    if get_origin(t) is Literal:                   # the choices, not the word "Literal"
        return " | ".join(repr(a) for a in get_args(t))
    if get_origin(t) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(t))
    return getattr(t, "__name__", str(t))


def _bounds(meta: msgspec.Meta) -> str:
    """A msgspec.Meta's limits as a reader writes them: '>= 0', 'in (0, 1]', 'matching cpu | cuda'."""
    if meta.description and meta.pattern:
        return f"({meta.description})"
    low = f"[{meta.ge}" if meta.ge is not None else f"({meta.gt}" if meta.gt is not None else None
    high = f"{meta.le}]" if meta.le is not None else f"{meta.lt})" if meta.lt is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {meta.ge}" if meta.ge is not None else f"> {meta.gt}"
    if high:
        return f"<= {meta.le}" if meta.le is not None else f"< {meta.lt}"
    return f"({meta.description})" if meta.description else ""


def _closest(word: str, choices) -> str:
    """The likely intended choice (case-insensitive), or the list of all of them."""
    by_lower = {c.lower(): c for c in choices}
    near = difflib.get_close_matches(word.lower(), list(by_lower), n=1)
    return f"'{by_lower[near[0]]}'" if near else "one of " + ", ".join(sorted(choices))


class _Parser:
    def __init__(self, path: str):
        self.path = path
        self.errors: list[str] = []
        self.explicit_restart: set[str] = set()     # nodes whose graph entry sets `restart:`
        self.vars: dict[str, Any] = {}       # the graph's variables, once parse() has read them

    def error(self, node: yaml.Node | int | None, msg: str, fix: str) -> None:
        if isinstance(node, int):
            line = f":{node}"
        else:
            line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(f"{self.path}{line}: {msg}. Fix: {fix}")

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if isinstance(node, yaml.MappingNode):
            return _items(node)
        self.error(node, f"{what} must be a mapping (key: value)", f"write {what} as 'key: value' lines")
        return None

    def check_keys(self, items, allowed: set[str], what: str) -> None:
        for key, (knode, _) in items.items():
            if key not in allowed:
                self.error(knode, f"unknown key '{key}' in {what}",
                           f"use {_closest(key, allowed)} (allowed: {', '.join(sorted(allowed))})")

    def parse(self, root: yaml.Node | None, overrides: list[str]) -> Graph:
        top = self.mapping(root, "the graph file") if root is not None else None
        if top is None or "nodes" not in top:
            if not self.errors:
                self.error(root, "no 'nodes:' section", "add 'nodes:' with one entry per node")
            raise GraphError(self.errors)
        self.check_keys(top, TOP_KEYS, "the graph file")
        self.vars = self.variables(top.get("vars", (None, None))[1], overrides)
        overrides = [o for o in overrides if "." in o.partition("=")[0] or "=" not in o]
        nodes_items = self.mapping(top["nodes"][1], "'nodes'") or {}

        specs: dict[str, NodeSpec] = {}
        classes: dict[str, type] = {}
        raw_inputs: dict[str, yaml.Node] = {}
        param_nodes: dict[str, yaml.Node | None] = {}
        for name, (knode, vnode) in nodes_items.items():
            spec = self.node(name, knode, vnode, classes, raw_inputs, param_nodes)
            if spec is not None:
                specs[name] = spec
        self.apply_overrides(specs, overrides)
        if any(getattr(cls, "listen", None) for cls in classes.values()):
            for name, spec in specs.items():          # a server heals: its nodes restart by default
                if name not in self.explicit_restart:
                    spec.restart = SERVED_RESTART
        for name, spec in specs.items():
            if name in classes:
                spec.params = self.params(spec, classes[name], param_nodes[name])
        edges = [e for name in specs for e in self.inputs(name, raw_inputs.get(name), specs, classes)]
        self.check_cycles(specs, edges)
        if self.errors:
            raise GraphError(self.errors)
        return Graph(self.path, specs, edges)

    def node(self, name, knode, vnode, classes, raw_inputs, param_nodes) -> NodeSpec | None:
        if not NAME.fullmatch(name):
            self.error(knode, f"node name '{name}' is not a plain name",
                       "use letters, digits, '_' and '-' (it appears in 'node/port' and file names)")
        items = self.mapping(vnode, f"node '{name}'")
        if items is None:
            return None
        self.check_keys(items, NODE_KEYS, f"node '{name}'")
        if "use" not in items:
            self.error(knode, f"node '{name}' has no 'use:'", "add 'use: package.module:ClassName'")
            return None
        use_node = items["use"][1]
        use = str(_plain(use_node))
        try:
            cls = import_class(use)
        except ValueError as e:
            self.error(use_node, str(e), "write 'use: package.module:ClassName'")
        except ImportError as e:
            self.error(use_node, f"node '{name}': cannot import '{use}' ({e})",
                       "check the module path (modules are found on sys.path and next to the graph "
                       "file), or install the package that provides it")
        except AttributeError:
            self.error(use_node, f"node '{name}': module '{use.partition(':')[0]}' has no "
                       f"'{use.partition(':')[2]}'", "check the class name")
        else:
            if self.check_class(cls, use, use_node):
                classes[name] = cls
        spec = NodeSpec(name=name, use=use, params={}, line=knode.start_mark.line + 1)
        if "params" in items:
            pnode = items["params"][1]
            if self.mapping(pnode, f"params of '{name}'") is not None:
                spec.params = self.substitute(_plain(pnode), self.vars, pnode, name)
            param_nodes[name] = pnode
        else:
            param_nodes[name] = None
        if "inputs" in items:
            raw_inputs[name] = items["inputs"][1]
        self.options(spec, items)
        return spec

    def check_class(self, cls, use: str, node: yaml.Node) -> bool:
        ok = isinstance(cls, type) and all(hasattr(cls, a) for a in ("inputs", "outputs", "process"))
        if not ok:
            self.error(node, f"'{use}' is not a Node class", "point 'use:' at a subclass of omniflow.Node")
            return False
        for port, kind in {**cls.inputs, **cls.outputs}.items():
            if kind not in KINDS:
                self.error(node, f"'{use}' declares port '{port}' of unknown kind '{kind}'",
                           f"use one of the kinds in omniflow.frame.KINDS: {', '.join(KINDS)}")
                ok = False
        return ok

    def options(self, spec: NodeSpec, items) -> None:
        if "restart" in items:
            vnode = items["restart"][1]
            value = str(_plain(vnode))
            if value not in RESTART_POLICIES:
                self.error(vnode, f"node '{spec.name}': unknown restart policy '{value}'",
                           f"use one of {', '.join(RESTART_POLICIES)}")
            spec.restart = value
            self.explicit_restart.add(spec.name)
        for key, typ, low in (("max_restarts", int, 0), ("backoff_s", float, 0.0)):
            if key in items:
                vnode = items[key][1]
                value = _plain(vnode)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low \
                        or (typ is int and not isinstance(value, int)):
                    self.error(vnode, f"node '{spec.name}': {key} must be a {typ.__name__} "
                               f">= {low}, got {value!r}", f"write e.g. '{key}: {typ(3)}'")
                else:
                    setattr(spec, key, typ(value))
        if "host" in items:
            vnode = items["host"][1]
            spec.host = str(_plain(vnode))
            try:
                split_host(spec.host)
            except ValueError as e:
                self.error(vnode, f"node '{spec.name}': {e}",
                           "write 'host: 10.0.0.2' or 'host: 10.0.0.2:47100' (a port base)")
        if "resources" in items:
            vnode = items["resources"][1]
            value = _plain(vnode)
            if not isinstance(value, dict) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                    for v in value.values()):
                self.error(vnode, f"node '{spec.name}': resources must map names to numbers "
                           f">= 0, got {value!r}", "write e.g. 'resources: {num_gpus: 1}'")
            else:
                spec.resources = {str(k): float(v) for k, v in value.items()}
        if "threads" in items:
            vnode = items["threads"][1]
            value = _plain(vnode)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self.error(vnode, f"node '{spec.name}': threads must be a whole number >= 1, "
                           f"got {value!r}", "write e.g. 'threads: 1' (or leave it out for the "
                           "libraries' default of one thread per core)")
            else:
                spec.threads = value

    def variables(self, vnode: yaml.Node | None, overrides: list[str]) -> dict[str, Any]:
        """The graph's `vars:` with the `--set name=value` (dotless) overrides applied."""
        variables: dict[str, Any] = {}
        if vnode is not None:
            items = self.mapping(vnode, "'vars'") or {}
            for name, (knode, value) in items.items():
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    self.error(knode, f"variable name '{name}' is not a plain name",
                               "use letters, digits and '_'")
                variables[name] = _plain(value)
        for item in overrides:
            key, eq, value = item.partition("=")
            if not eq or "." in key:
                continue
            if key not in variables:
                self.errors.append(f"--set {item}: the graph has no variable '{key}' "
                                   f"(variables: {', '.join(variables) or 'none'}). Fix: write "
                                   f"--set NODE.{key}=... for one node, or declare it under 'vars:'")
            else:
                variables[key] = yaml.safe_load(value) if value else ""
        return variables

    def substitute(self, value: Any, variables: dict[str, Any], pnode: yaml.Node, node: str) -> Any:
        """`value` with each `${name}` replaced: a whole-value reference takes the variable as
        it is (null, numbers), one inside a longer string is written into it."""
        if isinstance(value, dict):
            return {k: self.substitute(v, variables, pnode, node) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v, variables, pnode, node) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        for name in VAR.findall(value):
            if name not in variables:
                self.error(pnode, f"node '{node}': params use ${{{name}}}, which 'vars:' does not "
                           "declare", f"add '{name}: DEFAULT' under a top-level 'vars:'")
                return value
        whole = VAR.fullmatch(value)
        if whole:
            return variables[whole.group(1)]
        return VAR.sub(lambda m: str(variables[m.group(1)]), value)

    def apply_overrides(self, specs: dict[str, NodeSpec], overrides: list[str]) -> None:
        for item in overrides:
            key, eq, value = item.partition("=")
            name, dot, param = key.partition(".")
            if not eq or not dot or not param:
                self.errors.append(f"--set {item}: expected node.param=value. "
                                   "Fix: write e.g. --set src.path=examples/hello.wav")
            elif name not in specs:
                self.errors.append(f"--set {item}: no node '{name}'. "
                                   f"Fix: use {_closest(name, specs)}")
            elif param == "threads":                # the node key, not a param: --set vocoder.threads=1
                threads = yaml.safe_load(value) if value else None
                if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                    self.errors.append(f"--set {item}: threads must be a whole number >= 1. "
                                       f"Fix: write e.g. --set {name}.threads=1")
                else:
                    specs[name].threads = threads
            else:
                target = specs[name].params
                *parents, leaf = param.split(".")
                for p in parents:
                    target = target.setdefault(p, {})
                target[leaf] = yaml.safe_load(value) if value else ""

    def params(self, spec: NodeSpec, cls: type, pnode: yaml.Node | None) -> dict[str, Any]:
        Params = getattr(cls, "Params", None)
        try:
            validated = msgspec.convert(spec.params, Params)
        except msgspec.ValidationError as e:
            self.param_error(spec, Params, pnode, str(e))
            return spec.params
        except TypeError as e:  # Params is not a msgspec Struct
            self.error(pnode, f"node '{spec.name}': {spec.use}.Params cannot validate params ({e})",
                       "declare Params as a msgspec.Struct")
            return spec.params
        return msgspec.to_builtins(validated)

    def param_error(self, spec: NodeSpec, Params, pnode, msg: str) -> None:
        """Report every problem of one node's params: unknown names, missing ones, each value its
        type refuses (with what is allowed), else the combination Params refused."""
        fields = {f.name: f for f in msgspec.structs.fields(Params)}
        signature = ", ".join(f"{n}: {_type_name(f.type)}" for n, f in fields.items())
        items = _items(pnode) if isinstance(pnode, yaml.MappingNode) else {}
        cls = spec.use.partition(":")[2]
        given = spec.params if isinstance(spec.params, dict) else {}
        found = 0
        for key in [k for k in given if k not in fields]:
            node = items.get(key, (pnode, None))[0]
            self.error(node, f"node '{spec.name}': {cls} has no param '{key}'",
                       f"use {_closest(key, fields)} (params: {signature or 'none'})")
            found += 1
        for key in [n for n, f in fields.items() if f.required and n not in given]:
            self.error(pnode, f"node '{spec.name}': {cls} needs param '{key}'",
                       f"add '{key}: ...' under params (params: {signature})")
            found += 1
        for key, why in _bad_values(Params, given):       # every bad value, not just the first
            node = items.get(key, (pnode, None))[1]
            self.error(node, f"node '{spec.name}': param '{key}': {why}",
                       f"give '{key}' {_type_name(fields[key].type)} (params: {signature})")
            found += 1
        if not found:                                     # each value fits alone: a combination does not
            self.error(pnode, f"node '{spec.name}': {cls} params: {msg.split(' - at')[0]}",
                       f"change one of the values it names (params: {signature})")

    def inputs(self, name: str, inode, specs, classes) -> list[Edge]:
        if inode is None:
            return []
        items = self.mapping(inode, f"inputs of '{name}'") or {}
        cls = classes.get(name)
        edges = []
        for port, (knode, vnode) in items.items():
            if cls is not None and port not in cls.inputs:
                self.error(knode, f"node '{name}' has no input '{port}' "
                           f"(inputs: {', '.join(cls.inputs) or 'none'})",
                           f"use {_closest(port, cls.inputs)}" if cls.inputs
                           else f"remove 'inputs:' — {spec_class(specs[name])} takes no input")
                continue
            sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
            for snode in sources:
                edge = self.edge(name, port, snode, specs, classes)
                if edge is not None:
                    edges.append(edge)
        return edges

    def edge(self, name, port, snode, specs, classes) -> Edge | None:
        opts: dict[str, Any] = {}
        if isinstance(snode, yaml.MappingNode):
            items = _items(snode)
            self.check_keys(items, EDGE_KEYS, f"input '{name}/{port}'")
            if "from" not in items:
                self.error(snode, f"input '{name}/{port}' has no 'from:'", "add 'from: node/port'")
                return None
            opts = {k: _plain(v) for k, (_, v) in items.items() if k != "from"}
            where = items["from"][1]
            source = str(_plain(where))
            if opts.get("policy", "lossless") not in QUEUE_POLICIES:
                self.error(items["policy"][1], f"input '{name}/{port}': unknown policy "
                           f"'{opts['policy']}'", f"use one of {', '.join(QUEUE_POLICIES)}")
            depth = opts.get("depth", DEFAULT_DEPTH)
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                self.error(items["depth"][1], f"input '{name}/{port}': depth must be a positive "
                           f"integer, got {depth!r}", "write e.g. 'depth: 64'")
            if not isinstance(opts.get("feedback", False), bool):
                self.error(items["feedback"][1], f"input '{name}/{port}': feedback must be "
                           "true or false", "write 'feedback: true'")
        else:
            where, source = snode, str(_plain(snode))
        src, slash, src_port = source.partition("/")
        if not slash or not src or not src_port:
            self.error(where, f"node '{name}' input '{port}' comes from '{source}', which is not "
                       "'node/port'", "write the producer as 'node/port', e.g. 'mic/audio'")
            return None
        if src not in specs:
            self.error(where, f"node '{name}' input '{port}' comes from '{source}', but there is "
                       f"no node '{src}'", f"use {_closest(src, specs)}, or add node '{src}'")
            return None
        src_cls, dst_cls = classes.get(src), classes.get(name)
        kind = "any"
        if src_cls is not None:
            if src_port not in src_cls.outputs:
                outs = ", ".join(src_cls.outputs) or "none"
                fix = (f"use one of {', '.join(f'{src}/{p}' for p in src_cls.outputs)}"
                       if src_cls.outputs else f"'{src}' produces nothing; take input from another node")
                self.error(where, f"node '{name}' input '{port}' comes from '{source}', but node "
                           f"'{src}' has no output '{src_port}' (outputs: {outs})", fix)
                return None
            kind = src_cls.outputs[src_port]
            want = dst_cls.inputs[port] if dst_cls is not None else "any"
            if "any" not in (kind, want) and kind != want:
                self.error(where, f"node '{name}' input '{port}' expects '{want}' frames, but "
                           f"'{source}' produces '{kind}'",
                           f"connect an output that produces '{want}', or put a converter between")
        return Edge(src, src_port, name, port, kind=kind,
                    policy=opts.get("policy", "lossless"), depth=opts.get("depth", DEFAULT_DEPTH),
                    feedback=bool(opts.get("feedback", False)), line=where.start_mark.line + 1)

    def check_cycles(self, specs: dict[str, NodeSpec], edges: list[Edge]) -> None:
        after: dict[str, list[Edge]] = {n: [] for n in specs}
        for e in edges:
            if not e.feedback:
                after[e.src].append(e)
        state: dict[str, int] = {}          # 1 = on the current path, 2 = done
        path: list[str] = []

        def visit(n: str) -> None:
            state[n] = 1
            path.append(n)
            for e in after[n]:
                m = e.dst
                if state.get(m) == 1:
                    loop = path[path.index(m):] + [m]
                    self.error(e.line, f"loop {' -> '.join(loop)}: '{m}' waits on itself",
                               f"if the loop is intended, mark one of its edges 'feedback: true' "
                               f"(e.g. here: '{e.dst_port}: {{from: {e.src}/{e.src_port}, "
                               "feedback: true}}'); otherwise remove an edge")
                elif m not in state:
                    visit(m)
            path.pop()
            state[n] = 2

        for n in specs:
            if n not in state:
                visit(n)


def _bad_values(Params, params: dict[str, Any]) -> list[tuple[str, str]]:
    """(param, why) for every given value that its field's type (Literal, bounds) refuses."""
    bad = []
    for f in msgspec.structs.fields(Params):
        if f.name in params:
            try:
                msgspec.convert(params[f.name], f.type)
            except msgspec.ValidationError as e:
                bad.append((f.name, str(e).split(" - at")[0]))
    return bad


def split_host(host: str) -> tuple[str, int | None]:
    """'10.0.0.2' -> ('10.0.0.2', None); 'gpu-box:47100' -> ('gpu-box', 47100), the port of the
    node's first output edge (the k-th binds 47100 + k): every machine computes the same map."""
    name, colon, port = host.rpartition(":")
    if not colon or (":" in name and not name.startswith("[")):    # no port (or bare IPv6)
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"host '{host}' has a bad port base '{port}'")
    return name, int(port)                  # (an IPv6 name keeps its brackets, as tcp:// wants)


def spec_class(spec: NodeSpec) -> str:
    return spec.use.partition(":")[2] or spec.use
