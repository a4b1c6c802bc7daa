"""Check recorded HTTP exchanges against a provider's OpenAPI document (OpenAI JSON, Together YAML).

    spec = load_provider_spec("openai")                     # the copy vendored in tests/specs/ (see its README)
    spec.request_problems("POST", "/v1/fine_tuning/jobs", json=body)      -> list[str]   ([] = valid)
    spec.request_problems("POST", "/v1/files", multipart=req.multipart)   # field names + plain field values
    spec.response_problems("GET", "/v1/fine_tuning/jobs/ftjob-1", 200, json=payload)
    check_server(spec, replay_server)   # every request the SDK really sent + every response served
    check_recording(spec, recording)    # a recording file: request subsets (required ignored) + full responses

How:
- operations are found by method + path template (``/fine_tuning/jobs/{fine_tuning_job_id}``) after stripping
  the server's base path (``/v1``); literal segments win over templates (``/fine-tunes/estimate-price``);
- schemas are validated with jsonschema Draft 2020-12 through a ``referencing`` registry holding the whole
  document, so ``#/components/...`` refs resolve. Both specs carry OpenAPI-3.0 leftovers that 2020-12 does
  not understand (``nullable: true``, boolean ``exclusiveMinimum``): the document is rewritten once
  (``nullable`` -> a ``null`` alternative; boolean exclusive bounds -> numeric ones);
- ``strict`` (default) also reports object keys the schema never declares (union over allOf/anyOf/oneOf
  branches; objects with ``additionalProperties`` or without ``properties`` are open) -- OpenAPI response
  schemas rarely forbid extra keys, and a made-up key in a recording must not pass;
- each document is parsed and rewritten once per process (``functools.lru_cache``).

The specs are vendored, unmodified, in ``tests/specs/`` so every clone checks them; a missing file is an
error, not a skip (a contract check that quietly skips proves nothing).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
PROVIDER_SPECS = {"openai": "openai/openapi.json", "together": "together/openapi.yaml"}
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def load_provider_spec(provider: str) -> "OpenAPISpec":
    """The provider's spec vendored in ``tests/specs/``; FileNotFoundError (a failure) when it is missing."""
    return load_spec(spec_path(PROVIDER_SPECS[provider]))


def spec_path(relative: str) -> Path:
    """``tests/specs/<relative>``, which must exist: tests/specs/README.md says where each file comes from."""
    path = SPECS_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the provider specs are vendored in tests/specs/ "
                                "(tests/specs/README.md gives each file's source, commit and sha256)")
    return path


@functools.lru_cache(maxsize=None)
def load_spec(path: str | Path) -> "OpenAPISpec":
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        doc = json.loads(text)
    else:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(text, Loader=loader)  # noqa: S506 (safe loader)
    return OpenAPISpec(doc, uri=f"urn:tunekit-spec:{path.parent.name}")


# -- OpenAPI 3.0 leftovers -> JSON Schema 2020-12 ----------------------------------------------------------

def _rewrite(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _rewrite(value) for key, value in node.items()}
    nullable = node.pop("nullable", False) is True
    # {"allOf": [{"$ref": X}, {"nullable": true, ...}]} is how both specs say "X or null".
    for member in node.get("allOf", []):
        if isinstance(member, dict) and member.get("__nullable__"):
            nullable = True
            member.pop("__nullable__")
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(exclusive), bool):
            if node.pop(exclusive) and bound in node:
                node[exclusive] = node.pop(bound)
    if not nullable:
        return node
    composite = any(k in node for k in ("$ref", "allOf", "anyOf", "oneOf"))
    if not composite and "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        node["type"] = [*types, "null"] if "null" not in types else types
        if "enum" in node and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]
        return node
    if not composite:  # a bare {"nullable": true, "description": ...}: mark it for the enclosing allOf
        node["__nullable__"] = True
        return node
    return {"anyOf": [{"type": "null"}, node]}


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@dataclass(frozen=True)
class Operation:
    method: str
    template: str           # spec path template, e.g. /fine_tuning/jobs/{fine_tuning_job_id}
    pointer: str            # JSON pointer of the operation object
    node: dict[str, Any]
    path_item: dict[str, Any]


class OpenAPISpec:
    def __init__(self, doc: dict[str, Any], uri: str) -> None:
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.doc = _rewrite(doc)
        self.uri = uri
        self.registry = Registry().with_resource(uri, Resource(contents=self.doc, specification=DRAFT202012))
        servers = self.doc.get("servers") or [{"url": ""}]
        self.base_path = urlsplit(servers[0]["url"]).path.rstrip("/")
        self._templates: list[tuple[re.Pattern[str], int, str]] = []
        for template in self.doc.get("paths", {}):
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            literal = sum(1 for seg in template.split("/") if seg and not seg.startswith("{"))
            self._templates.append((re.compile(regex), literal, template))
        self._templates.sort(key=lambda t: -t[1])  # most literal segments first

    # -- lookup -----------------------------------------------------------------------------------------

    def operation(self, method: str, path: str) -> Operation | None:
        path = urlsplit(path).path
        if self.base_path and path.startswith(self.base_path + "/"):
            path = path[len(self.base_path):]
        for regex, _, template in self._templates:
            path_item = self.doc["paths"][template]
            if regex.match(path) and method.lower() in path_item:
                pointer = f"/paths/{_escape(template)}/{method.lower()}"
                return Operation(method.upper(), template, pointer, path_item[method.lower()], path_item)
        return None

    def _deref(self, node: Any, pointer: str) -> tuple[Any, str]:
        """Follow local ``$ref``s that point at whole components (requestBodies, responses, parameters)."""
        while isinstance(node, dict) and set(node) <= {"$ref", "description", "summary"} and "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self.doc
            for token in pointer.strip("/").split("/"):
                node = node[token.replace("~1", "/").replace("~0", "~")]
        return node, pointer

    # -- validation -------------------------------------------------------------------------------------

    def schema_problems(self, pointer: str, instance: Any, *, strict: bool = True, partial: bool = False,
                        where: str = "body") -> list[str]:
        """Validate ``instance`` against the schema at JSON ``pointer`` in the document."""
        from jsonschema import Draft202012Validator

        validator = Draft202012Validator({"$ref": f"{self.uri}#{pointer}"}, registry=self.registry)
        problems = []
        for error in validator.iter_errors(instance):
            if partial and _only_missing_required(error):
                continue
            location = "".join(f"[{p!r}]" for p in error.absolute_path)
            problems.append(f"{where}{location}: {error.message[:300]}")
        if strict:
            resolver = self.registry.resolver().lookup(f"{self.uri}#{pointer}")
            problems += [f"{where}{loc}: key not in the spec schema"
                         for loc in _unknown_keys(resolver.contents, resolver.resolver, instance, "")]
        return problems

    def request_problems(self, method: str, path: str, *, json: Any = None,
                         multipart: list[dict[str, Any]] | None = None, query: dict[str, Any] | None = None,
                         strict: bool = True, partial: bool = False) -> list[str]:
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in the spec"]
        label = f"{method} {op.template}"
        problems = [f"{label} {p}" for p in self._query_problems(op, query or {})]
        body_node = op.node.get("requestBody")
        if json is None and multipart is None:
            if isinstance(body_node, dict) and body_node.get("required"):
                problems.append(f"{label}: request body is required")
            return problems
        if body_node is None:
            return problems + [f"{label}: the spec documents no request body"]
        body, pointer = self._deref(body_node, op.pointer + "/requestBody")
        media = "multipart/form-data" if multipart is not None else "application/json"
        content = body.get("content", {})
        if media not in content:
            return problems + [f"{label}: body media type {media} not in the spec ({sorted(content)})"]
        schema_pointer = f"{pointer}/content/{_escape(media)}/schema"
        if multipart is not None:
            # Field names and plain values; a file part stands in as a placeholder string (format: binary).
            instance = {p["name"]: p.get("value", "<binary>") if p.get("filename") is None else "<binary>"
                        for p in multipart}
        else:
            instance = json
        return problems + [f"{label} request {p}" for p in
                           self.schema_problems(schema_pointer, instance, strict=strict, partial=partial)]

    def response_problems(self, method: str, path: str, status: int, *, json: Any = None,
                          strict: bool = True, error_schema: str | None = None) -> list[str]:
        """``error_schema`` (a components/schemas name) covers error statuses the operation leaves out."""
        op = self.operation(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in the spec"]
        label = f"{method} {op.template} -> {status}"
        responses = {str(k): v for k, v in op.node.get("responses", {}).items()}
        key = next((k for k in (str(status), f"{str(status)[0]}XX", "default") if k in responses), None)
        if key is None:
            if status >= 400 and error_schema:
                return [f"{label} {p}" for p in self.schema_problems(
                    f"/components/schemas/{error_schema}", json, strict=strict, where="response")]
            return [f"{label}: status not documented (documented: {sorted(responses)})"]
        response, pointer = self._deref(responses[key], f"{op.pointer}/responses/{_escape(key)}")
        content = response.get("content") or {}
        if json is None:
            return [] if "application/json" not in content else [f"{label}: JSON body expected"]
        if "application/json" not in content:
            return [f"{label}: the spec documents no JSON body (has {sorted(content)})"]
        schema_pointer = f"{pointer}/content/application~1json/schema"
        return [f"{label} {p}" for p in self.schema_problems(schema_pointer, json, strict=strict, where="response")]

    def _query_problems(self, op: Operation, query: dict[str, Any]) -> list[str]:
        params = {}
        for i, raw in enumerate([*op.path_item.get("parameters", []), *op.node.get("parameters", [])]):
            param, _ = self._deref(raw, "")
            if param.get("in") == "query":
                params[param["name"]] = param
        problems = []
        for name, value in query.items():
            base = name.split("[", 1)[0]
            param = params.get(name) or (params.get(base) if "[" in name else None)
            if param is None:
                problems.append(f"query {name!r}: not a documented parameter ({sorted(params)})")
                continue
            if "[" in name and param.get("style") != "deepObject":
                problems.append(f"query {name!r}: {base!r} is not a deepObject parameter")
                continue
            schema = param.get("schema", {})
            if "[" not in name and schema.get("type") == "integer" and not str(value).lstrip("-").isdigit():
                problems.append(f"query {name!r}: {value!r} is not an integer")
        return problems


def _only_missing_required(error: Any) -> bool:
    """For request SUBSETS in recordings: a missing required key is expected, nothing else is."""
    if error.validator == "required":
        return True
    if error.validator in ("anyOf", "oneOf") and error.context:
        by_branch: dict[int, list[Any]] = {}
        for sub in error.context:
            by_branch.setdefault(sub.schema_path[0], []).append(sub)
        return any(all(_only_missing_required(e) for e in errs) for errs in by_branch.values())
    return False


def _branches(schema: Any, resolver: Any, seen: frozenset[int] = frozenset()) -> list[tuple[dict, Any]]:
    """The schema plus everything reachable through $ref / allOf / anyOf / oneOf (for the key union)."""
    if not isinstance(schema, dict) or id(schema) in seen:
        return []
    seen = seen | {id(schema)}
    out = [(schema, resolver)]
    if "$ref" in schema:
        resolved = resolver.lookup(schema["$ref"])
        out += _branches(resolved.contents, resolved.resolver, seen)
    for keyword in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(keyword, []):
            out += _branches(sub, resolver, seen)
    return out


def _unknown_keys(schema: Any, resolver: Any, instance: Any, where: str) -> list[str]:
    return _unknown_in(_branches(schema, resolver), instance, where)


def _unknown_in(branches: list[tuple[dict, Any]], instance: Any, where: str) -> list[str]:
    """Keys of ``instance`` that no branch declares (recursing with the union of the branches' subschemas)."""
    if isinstance(instance, dict):
        props: dict[str, list[tuple[dict, Any]]] = {}
        declares_object = open_object = False
        for node, res in branches:
            if "properties" in node:
                declares_object = True
                for key, sub in node["properties"].items():
                    props.setdefault(key, []).extend(_branches(sub, res))
            if node.get("additionalProperties") not in (None, False) or "patternProperties" in node:
                open_object = True
        if not declares_object:
            return []  # free-form object (metadata, arbitrary maps)
        found = []
        for key, value in instance.items():
            if key in props:
                found += _unknown_in(props[key], value, f"{where}[{key!r}]")
            elif not open_object:
                found.append(f"{where}[{key!r}]")
        return found
    if isinstance(instance, list):
        items = [pair for node, res in branches if isinstance(node.get("items"), dict)
                 for pair in _branches(node["items"], res)]
        if not items:
            return []
        return [loc for i, value in enumerate(instance) for loc in _unknown_in(items, value, f"{where}[{i}]")]
    return []


# -- whole recordings / servers ----------------------------------------------------------------------------

def check_server(spec: OpenAPISpec, server: Any, *, strict: bool = True, error_schema: str | None = None,
                 skip_paths: tuple[str, ...] = ()) -> list[str]:
    """Validate every request the replay server received (full bodies, as the SDK sent them) and every
    exchange's scripted response."""
    problems = []
    for req in server.requests:
        if req.path in skip_paths:
            continue
        problems += spec.request_problems(req.method, req.path, json=req.json, multipart=req.multipart,
                                          query=req.query, strict=strict)
    problems += _response_checks(spec, server.exchanges, strict=strict, error_schema=error_schema)
    return problems


def check_recording(spec: OpenAPISpec, recording: dict[str, Any] | str | Path, *, strict: bool = True,
                    error_schema: str | None = None) -> list[str]:
    """A recording file on its own: request ``json`` subsets (missing required keys allowed) and responses."""
    if not isinstance(recording, dict):
        recording = json.loads(Path(recording).read_text())
    problems = []
    for exchange in recording["exchanges"]:
        req = exchange["request"]
        if "json" in req:
            problems += spec.request_problems(req["method"], req["path"], json=req["json"],
                                              query=req.get("query"), strict=strict, partial=True)
        elif spec.operation(req["method"], req["path"]) is None:
            problems.append(f"{req['method']} {req['path']}: no such operation in the spec")
    return problems + _response_checks(spec, recording["exchanges"], strict=strict, error_schema=error_schema)


def _response_checks(spec: OpenAPISpec, exchanges: list[dict[str, Any]], *, strict: bool,
                     error_schema: str | None) -> list[str]:
    problems = []
    for exchange in exchanges:
        req, resp = exchange["request"], exchange["response"]
        if resp.get("drop"):
            continue
        # A non-empty raw body (a file's content) is checked as the string the spec documents for downloads.
        body = copy.deepcopy(resp["json"]) if "json" in resp else (resp.get("body") or None)
        problems += spec.response_problems(req["method"], req["path"], int(resp.get("status", 200)),
                                           json=body, strict=strict, error_schema=error_schema)
    return problems
