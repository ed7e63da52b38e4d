"""The FineTuneJob CustomResourceDefinition, generated from the pydantic spec and status (one source of truth).

pydantic emits JSON Schema; Kubernetes wants a structural OpenAPI v3 schema. This module inlines
references, turns optional unions into plain typed fields, int-or-string unions into
`x-kubernetes-int-or-string`, free-form maps into `x-kubernetes-preserve-unknown-fields`, and adds
the CEL rules: those spec.py declares (one-of fields, URI schemes, label keys, tolerations, the
name's length per node count, the rules that tie one spec field to another) and immutability of
everything but spec.MUTABLE_FIELDS. Every bound
comes from spec.py, so `kubetune validate` and the API server give the same answer; a string, list,
map or integer without an upper bound there is an error here (the API server needs the bounds to cost
the CEL rules, and a bound the CLI does not share is a disagreement).
"""

from __future__ import annotations

from typing import Any

from kubetune_api import spec as api
from kubetune_api.status import FineTuneJobStatus

GROUP, VERSION = api.API_VERSION.split("/")
PLURAL, SINGULAR, SHORT = "finetunejobs", "finetunejob", "ftj"
_DROP = {"title", "additionalProperties", "$defs"}
#: The upper bound each kind of node must carry, in OpenAPI's spelling.
_BOUNDS = {"string": "maxLength", "array": "maxItems", "integer": "maximum"}


def _inline(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not ref:
        return node
    target = defs[ref.split("/")[-1]]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _union(node: dict[str, Any], defs: dict[str, Any], *, bounded: bool) -> dict[str, Any]:
    branches = [_inline(b, defs) for b in node["anyOf"] if b.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(branches) == 1:
        out = structural({**branches[0], **rest}, defs, bounded=bounded)
        if len(branches) < len(node["anyOf"]) and rest.get("default") is not None:
            out["nullable"] = True  # null means something other than the default (evalSplit: null)
        return out
    types = {b.get("type") for b in branches}
    if types == {"string", "integer"}:  # "epoch" | N steps
        words = [w for b in branches for w in ([b["const"]] if "const" in b else b.get("enum", []))]
        rule = {
            "rule": f"type(self) == string ? self in {words!r} : int(self) > 0",
            "message": f"use {' or '.join(words)}, or a positive number of steps",
        }
        out = {"x-kubernetes-int-or-string": True, "x-kubernetes-validations": [rule]}
        return {**out, **{k: v for k, v in structural(rest, defs, bounded=bounded).items() if k != "type"}}
    raise ValueError(f"cannot express union {types} in a structural schema")


def structural(node: dict[str, Any], defs: dict[str, Any], *, bounded: bool = True) -> dict[str, Any]:
    """A structural OpenAPI v3 schema node for a pydantic JSON Schema node.

    bounded: every string, list, map and integer must carry an upper bound (the spec's, which CEL rules
    read). The status has no CEL rules, and a bound there would make the API server refuse a whole
    status write over one long message, so it is generated unbounded."""
    node = _inline(node, defs)
    if "anyOf" in node:
        return _union(node, defs, bounded=bounded)
    if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node:
        return node  # already OpenAPI (spec.free_form): any value, nested to a bound
    if "propertyNames" in node:
        raise ValueError(f"CRDs cannot bound map keys ({node.get('description')}): give the map a CEL rule")
    out: dict[str, Any] = {k: v for k, v in node.items() if k not in _DROP and not k.startswith("exclusive")}
    for bound in ("Minimum", "Maximum"):
        if f"exclusive{bound}" in node:  # JSON Schema 2020 numbers -> OpenAPI v3.0 booleans
            out[bound.lower()] = node[f"exclusive{bound}"]
            out[f"exclusive{bound}"] = True
    if out.get("maximum") == api.INT64_MAX:
        # The API server reads a maximum as a float64, which cannot hold 2^63-1; its integers are int64
        # anyway, so the format says the same.
        del out["maximum"]
        out["format"] = "int64"
    if "const" in out:
        out["enum"] = [out.pop("const")]
    if out.get("default", 0) is None:
        del out["default"]
    kind = out.get("type")
    if kind == "object" or "properties" in node:
        _object(out, node, defs, bounded=bounded)
    elif kind == "array":
        out["items"] = structural(node["items"], defs, bounded=bounded)
    if bounded and kind in _BOUNDS and "enum" not in out:
        _require(out, _BOUNDS[kind])
    return out


def _object(out: dict[str, Any], node: dict[str, Any], defs: dict[str, Any], *, bounded: bool) -> None:
    """An object's fields, a map's values, or (with neither) any fields."""
    out["type"] = "object"
    if "properties" in node:
        out["properties"] = {k: structural(v, defs, bounded=bounded) for k, v in node["properties"].items()}
        if isinstance(out.get("default"), dict):
            out["default"] = {}  # nested defaults fill in from the properties' own defaults
    elif isinstance(node.get("additionalProperties"), dict) and node["additionalProperties"]:
        out["additionalProperties"] = structural(node["additionalProperties"], defs, bounded=bounded)
        if bounded:
            _require(out, "maxProperties")
    else:
        out["x-kubernetes-preserve-unknown-fields"] = True


def _require(node: dict[str, Any], bound: str) -> None:
    if bound not in node and not (bound == "maximum" and node.get("format") == "int64"):
        raise ValueError(f"no {bound} on {node.get('description') or node}: give the field a bound in spec.py")


def immutability(properties: dict[str, Any]) -> list[dict[str, str]]:
    """Transition rules: every spec field but MUTABLE_FIELDS keeps its value after creation."""
    rules = []
    for name, schema in properties.items():
        mutable = [f.split(".", 1)[1] for f in api.MUTABLE_FIELDS if f.split(".", 1)[0] == name]
        if not mutable:
            rules.append(_same(f"self.{name}", f"oldSelf.{name}", f"spec.{name} cannot change after creation"))
            continue
        for sub in schema.get("properties", {}):
            if sub not in mutable:
                path = f"{name}.{sub}"
                rules.append(_same(f"self.{path}", f"oldSelf.{path}", f"spec.{path} cannot change after creation"))
    return rules


def _same(new: str, old: str, message: str) -> dict[str, str]:
    parent_new = new.rsplit(".", 1)[0]
    parent_old = old.rsplit(".", 1)[0]
    rule = (
        f"has({new}) == has({old}) && (!has({new}) || {new} == {old})"
        if parent_new == "self"
        else f"!has({parent_new}) || !has({parent_old}) || "
        f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"
    )
    return {"rule": rule, "message": message}


COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent", "description": "percent done"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss"},
    {"name": "Eval", "type": "string", "jsonPath": ".status.eval"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def spec_schema() -> dict[str, Any]:
    raw = api.FineTuneJobSpec.model_json_schema(by_alias=True)
    schema = structural(raw, raw.get("$defs", {}))
    # The spec's own rules (spec.SPEC_RULES, which tie one field to another), then immutability.
    schema["x-kubernetes-validations"] = [
        *schema.get("x-kubernetes-validations", []),
        *immutability(schema["properties"]),
    ]
    return schema


def status_schema() -> dict[str, Any]:
    """The status subresource's schema, from FineTuneJobStatus: what the model lacks, the API server prunes."""
    raw = FineTuneJobStatus.model_json_schema(by_alias=True)
    return structural(raw, raw.get("$defs", {}), bounded=False)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT],
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": api.FineTuneJob.__doc__,
                            "required": ["spec"],
                            "x-kubernetes-validations": [api.NAME_RULE],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }
