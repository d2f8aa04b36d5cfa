"""The CRDs' CEL rules (``x-kubernetes-validations``), evaluated on the rendered objects.

tests/test_manifests.py checks every rendered object against its CRD's ``openAPIV3Schema``; the
API server also runs the CEL rules the schema declares, and so does this file, with cel-expr-python
(the CEL project's binding of cel-cpp), the way the API server does:

- a rule applies at the schema node that declares it, and ``self`` is that node's value (at the
  root the object, whose ``metadata`` shows only ``name`` and ``generateName``); property names
  are escaped as Kubernetes escapes them (``x-y`` is ``self.x__dash__y``); ``number`` fields are
  doubles;
- schema defaults are applied first; a rule on an absent (or null) field is not evaluated, nor a
  rule under the items of an empty list;
- a rule that uses ``oldSelf`` (a transition rule) runs only on an update, and only where the old
  object has a value at the correlated place: through properties, map values and the items of
  ``x-kubernetes-list-type: map`` lists (matched by their keys), never through other lists;
  ``optionalOldSelf: true`` rules run on a create too, with ``oldSelf`` an empty optional;
- a failed rule reports its ``messageExpression`` (when that evaluates to a non-blank string),
  else its ``message``, else ``failed rule: <rule>``; an evaluation error rejects the object.

Every rendered object whose CRD is in the folder passes on a create and on an update to itself.
Objects derived from the rendered RayService (a RayCluster, a RayJob, the fields the overlays
leave unset) reach the rules no rendered object reaches, and one mutation per rule shows that
the evaluator rejects, with the rule's message. A rule that appears in a new CRD version is
caught by ``test_every_rule_is_evaluated_and_rejects_something``.

Not modelled: the API server's type-checking of a rule against the schema (values here are
``dyn``), its cost limits, order-insensitive equality of ``set``/``map`` lists, validation
ratcheting (an update here re-runs every rule), and Kubernetes' own CEL libraries (quantity,
url, ip, lists, regex, sets, ...), which cel-expr-python does not have: a rule that uses one
fails ``test_every_rule_compiles``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import yaml
from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_encoders, ext_math, ext_optional, ext_strings

from serve_app.tools import manifests
from test_manifests import CRD_DIR, VARIANTS, rendered, served_crd_schemas, validation_errors


# -- the rules in the CRD folder -----------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    crd: str  # the CRD's file name
    version: str  # e.g. ray.io/v1
    kind: str
    path: str  # schema path: spec.rayClusterConfig.workerGroupSpecs[*].groupName, a map's values {*}
    index: int  # position in that node's x-kubernetes-validations
    rule: str
    message: str | None = None
    message_expression: str | None = None
    optional_old_self: bool = False

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.crd, self.version, self.path, self.index)

    def __str__(self) -> str:
        return f"{self.kind} {self.version} {self.path or '<root>'} #{self.index}: {self.rule}"


@dataclass
class CRDVersion:
    crd: str
    version: str
    kind: str
    schema: dict


@lru_cache(maxsize=1)
def crd_versions() -> dict[tuple[str, str], CRDVersion]:
    """(apiVersion, kind) -> the served version's schema, for every CRD in the folder."""
    return {(api_version, kind): CRDVersion(crd, api_version, kind, schema)
            for (api_version, kind), (crd, schema) in served_crd_schemas().items()}


def _child(path: str, step: str) -> str:
    return f"{path}{step}" if step.startswith(("[", "{")) or not path else f"{path}.{step}"


def _rules_at(crd: CRDVersion, schema: dict, path: str) -> list[Rule]:
    return [Rule(crd.crd, crd.version, crd.kind, path, i, r["rule"], r.get("message"),
                 r.get("messageExpression"), bool(r.get("optionalOldSelf")))
            for i, r in enumerate(schema.get("x-kubernetes-validations") or [])]


def _rules_under(crd: CRDVersion, schema, path: str) -> list[Rule]:
    """Every ``x-kubernetes-validations`` anywhere in ``schema``, wherever it sits: a rule under
    ``allOf``/``anyOf``/... gets a path the evaluator never visits, so the coverage test sees it."""
    if isinstance(schema, list):
        return [r for i, s in enumerate(schema) for r in _rules_under(crd, s, f"{path}[{i}]")]
    if not isinstance(schema, dict):
        return []
    found = _rules_at(crd, schema, path)
    for key, sub in schema.items():
        if key == "properties" and isinstance(sub, dict):
            found += [r for name, s in sub.items() for r in _rules_under(crd, s, _child(path, name))]
        elif key == "items":
            found += _rules_under(crd, sub, _child(path, "[*]"))
        elif key == "additionalProperties":
            found += _rules_under(crd, sub, _child(path, "{*}"))
        elif key not in ("x-kubernetes-validations", "default", "enum", "example"):
            found += _rules_under(crd, sub, _child(path, f"<{key}>"))
    return found


@lru_cache(maxsize=1)
def all_rules() -> tuple[Rule, ...]:
    return tuple(r for crd in crd_versions().values() for r in _rules_under(crd, crd.schema, ""))


# -- CEL -------------------------------------------------------------------------------------------
def _env(variables) -> cel.Env:
    return cel.NewEnv(variables={v: cel.Type.DYN for v in variables},
                      extensions=[ext_strings.ExtStrings(), ext_optional.ExtOptional(), ext_math.ExtMath(),
                                  ext_encoders.ExtEncoders(), ext_bindings.ExtBindings()])


_ENVS = {"self": _env(["self"]), "both": _env(["self", "oldSelf"]), "optional": _env(["self", "__oldSelf"])}


@dataclass(frozen=True)
class Compiled:
    program: cel.Expression
    transition: bool  # uses oldSelf
    # With optionalOldSelf: programs with oldSelf bound to optional.of(__oldSelf) / optional.none().
    with_old: cel.Expression | None = None
    without_old: cel.Expression | None = None


@lru_cache(maxsize=None)
def compile_rule(rule: str, optional_old_self: bool = False) -> Compiled:
    """The rule type-checked as the API server does when the CRD is created: an undeclared
    function or variable is an error here. A rule is a transition rule when it refers to oldSelf."""
    try:
        return Compiled(_ENVS["self"].compile(rule), transition=False)
    except RuntimeError as exc:
        if "oldSelf" not in str(exc):
            raise
    program = _ENVS["both"].compile(rule)  # raises for anything else that does not compile
    if optional_old_self:
        return Compiled(program, True,
                        _ENVS["optional"].compile(f"cel.bind(oldSelf, optional.of(__oldSelf), {rule})"),
                        _ENVS["optional"].compile(f"cel.bind(oldSelf, optional.none(), {rule})"))
    return Compiled(program, True)


def _run(program: cel.Expression, data: dict):
    value = program.eval(data=data)
    if value.type() == cel.Type.ERROR:
        raise RuntimeError(str(value.value()))
    return value.plain_value()


# -- values as the API server hands them to CEL ------------------------------------------------------
_CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
                 "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
                 "void", "while"}
_IDENT = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


def escape_property(name: str) -> str | None:
    """A property name as a CEL field name (k8s.io/apiserver/pkg/cel: None when inaccessible)."""
    if name in _CEL_RESERVED:
        return f"__{name}__"
    escaped = (name.replace("__", "__underscores__").replace(".", "__dot__")
               .replace("-", "__dash__").replace("/", "__slash__"))
    return escaped if _IDENT.fullmatch(escaped) else None


def to_cel(value, schema: dict, *, embedded: bool = False):
    """``value`` as ``self`` sees it at ``schema``: declared properties only, escaped; numbers of
    ``type: number`` as doubles; an object's (or embedded resource's) metadata as name and generateName."""
    if value is None:
        return None
    if isinstance(value, dict):
        props = schema.get("properties")
        if embedded or schema.get("x-kubernetes-embedded-resource"):
            value = {**value, "metadata": {k: v for k, v in (value.get("metadata") or {}).items()
                                           if k in ("name", "generateName")}}
            props = {"metadata": {"type": "object"}, **(props or {})}
        if props:
            out = {}
            for name, sub in props.items():
                cel_name = escape_property(name)
                if name in value and cel_name is not None:
                    out[cel_name] = to_cel(value[name], sub)
            return out
        if isinstance(schema.get("additionalProperties"), dict):
            return {k: to_cel(v, schema["additionalProperties"]) for k, v in value.items()}
        return value  # x-kubernetes-preserve-unknown-fields / an open object: as it is
    if isinstance(value, list):
        items = schema.get("items") or {}
        return [to_cel(v, items) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def with_defaults(value, schema: dict):
    """A copy of ``value`` with the schema's defaults applied, as the API server does before
    validating (a default fills an absent property of an object that is present)."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        out = {}
        for name, item in value.items():
            sub = props.get(name, schema.get("additionalProperties"))
            out[name] = with_defaults(item, sub) if isinstance(sub, dict) else copy.deepcopy(item)
        for name, sub in props.items():
            if name not in out and "default" in sub:
                out[name] = with_defaults(copy.deepcopy(sub["default"]), sub)
        return out
    if isinstance(value, list):
        return [with_defaults(v, schema.get("items") or {}) for v in value]
    return value


# -- the evaluator ---------------------------------------------------------------------------------
_MISSING = object()


@dataclass
class Failure:
    rule: Rule
    path: str  # where in the object, e.g. spec.deletionStrategy.deletionRules[0].condition
    message: str

    def __str__(self) -> str:
        return f"{self.rule.kind}: {self.path or '<root>'}: {self.message}"


@dataclass
class Report:
    failures: list[Failure] = field(default_factory=list)
    evaluated: set[tuple] = field(default_factory=set)  # rule keys evaluated at least once
    passed: set[tuple] = field(default_factory=set)  # ... and held there
    absent: set[tuple] = field(default_factory=set)  # not evaluated somewhere: no value there
    transition_skipped: set[tuple] = field(default_factory=set)  # create, or no correlated old value


def _failure_message(rule: Rule, data: dict, env: str) -> str:
    if rule.message_expression:
        try:
            program = _ENVS[env].compile(rule.message_expression)
            message = _run(program, data)
            if isinstance(message, str) and message.strip():
                return message
        except RuntimeError:
            pass
    return rule.message or f"failed rule: {rule.rule}"


def _evaluate_rules(rules: list[Rule], value, old, schema: dict, path: str, report: Report, is_root: bool):
    if not rules:
        return
    self_ = to_cel(value, schema, embedded=is_root)
    old_ = to_cel(old, schema, embedded=is_root) if old is not _MISSING else _MISSING
    for rule in rules:
        compiled = compile_rule(rule.rule, rule.optional_old_self)
        if not compiled.transition:
            program, data, env = compiled.program, {"self": self_}, "self"
        elif rule.optional_old_self:
            if old_ is _MISSING:
                program, data = compiled.without_old, {"self": self_}
            else:
                program, data = compiled.with_old, {"self": self_, "__oldSelf": old_}
            env = "optional"
        elif old_ is _MISSING:
            report.transition_skipped.add(rule.key)
            continue
        else:
            program, data, env = compiled.program, {"self": self_, "oldSelf": old_}, "both"
        report.evaluated.add(rule.key)
        try:
            result = _run(program, data)
        except RuntimeError as exc:
            report.failures.append(Failure(rule, path, f"{rule.rule}: evaluation error: {exc}"))
            continue
        if result is True:
            report.passed.add(rule.key)
        elif result is False:
            # (an optionalOldSelf rule's messageExpression sees self only here)
            message = (_failure_message(rule, {"self": self_}, "self") if env == "optional"
                       else _failure_message(rule, data, env))
            report.failures.append(Failure(rule, path, message))
        else:
            report.failures.append(Failure(rule, path, f"{rule.rule}: evaluated to {result!r}, not a bool"))


def _walk(crd: CRDVersion, schema: dict, spath: str, value, old, opath: str, report: Report):
    """Evaluate the rules at ``schema`` (``value`` is present) and below. ``old`` is the correlated
    old value, or _MISSING (a create, or nothing correlates)."""
    _evaluate_rules(_rules_at(crd, schema, spath), value, old, schema, opath, report, is_root=spath == "")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for name, sub in props.items():
            child = value.get(name)
            if child is None:
                report.absent.update(r.key for r in _rules_under(crd, sub, _child(spath, name)))
                continue
            old_child = old.get(name, _MISSING) if isinstance(old, dict) else _MISSING
            old_child = _MISSING if old_child is None else old_child
            _walk(crd, sub, _child(spath, name), child, old_child, _child(opath, name), report)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            entries = [(k, v) for k, v in value.items() if v is not None]
            if not entries:
                report.absent.update(r.key for r in _rules_under(crd, extra, _child(spath, "{*}")))
            for k, v in entries:
                old_child = old.get(k, _MISSING) if isinstance(old, dict) else _MISSING
                old_child = _MISSING if old_child is None else old_child
                _walk(crd, extra, _child(spath, "{*}"), v, old_child, f"{opath}[{k!r}]", report)
    elif isinstance(value, list):
        items = schema.get("items") or {}
        present = [(i, v) for i, v in enumerate(value) if v is not None]
        if not present:
            report.absent.update(r.key for r in _rules_under(crd, items, _child(spath, "[*]")))
        keys = schema.get("x-kubernetes-list-map-keys") or []
        correlate = schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list)
        for i, item in present:
            old_item = _MISSING
            if correlate and isinstance(item, dict):
                ident = tuple(item.get(k) for k in keys)
                old_item = next((o for o in old if isinstance(o, dict) and tuple(o.get(k) for k in keys) == ident),
                                _MISSING)
            _walk(crd, items, _child(spath, "[*]"), item, old_item, f"{opath}[{i}]", report)


def evaluate_schema(crd: CRDVersion, obj: dict, old: dict | None = None) -> Report:
    """The CEL rules of ``crd`` on ``obj``: a create, or with ``old`` an update from it."""
    report = Report()
    new = with_defaults(obj, crd.schema)
    previous = _MISSING if old is None else with_defaults(old, crd.schema)
    _walk(crd, crd.schema, "", new, previous, "", report)
    return report


def crd_of(obj: dict) -> CRDVersion | None:
    return crd_versions().get((obj.get("apiVersion", ""), obj.get("kind", "")))


def evaluate(obj: dict, old: dict | None = None) -> Report:
    crd = crd_of(obj)
    assert crd is not None, f"no CRD for {obj.get('apiVersion')} {obj.get('kind')} in {CRD_DIR}"
    return evaluate_schema(crd, obj, old)


def rule_failures(obj: dict, old: dict | None = None) -> list[str]:
    name = f"{obj['kind']} {obj['metadata']['name']}"
    return [f"{name}: {f}" for f in evaluate(obj, old).failures]


# -- the objects -------------------------------------------------------------------------------------
def _rayservice() -> dict:
    return copy.deepcopy(manifests.the_rayservice(list(rendered("prod"))))


def derived_objects() -> dict[str, dict]:
    """Valid objects that set what the overlays leave to KubeRay's defaults, and the kinds this
    project does not render (a RayCluster and a RayJob with the RayService's cluster spec)."""
    rs = _rayservice()
    rs["spec"]["managedBy"] = "ray.io/kuberay-operator"
    cluster = rs["spec"]["rayClusterConfig"]
    cluster["managedBy"] = "kueue.x-k8s.io/multikueue"
    cluster.setdefault("gcsFaultToleranceOptions", {"redisAddress": "serve-app-redis:6379"})["backend"] = "redis"
    meta = {"name": "serve-app", "namespace": rs["metadata"].get("namespace", "serve-app")}
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": dict(meta),
                  "spec": copy.deepcopy(cluster)}
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {**meta, "name": "serve-app-job"},
           "spec": {"entrypoint": "python -m serve_app.tools.train", "managedBy": "ray.io/kuberay-operator",
                    "shutdownAfterJobFinishes": True, "rayClusterSpec": copy.deepcopy(cluster),
                    "deletionStrategy": {"deletionRules": [
                        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}},
                        {"policy": "DeleteSelf", "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": 60}},
                    ]}}}
    legacy = copy.deepcopy(job)
    legacy["metadata"]["name"] = "serve-app-job-legacy"
    legacy["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"},
                                          "onFailure": {"policy": "DeleteNone"}}
    return {"RayService with managedBy and backend": rs, "RayCluster": raycluster,
            "RayJob with deletionRules": job, "RayJob with onSuccess/onFailure": legacy}


def _in(obj: dict, *path):
    for step in path:
        obj = obj[step]
    return obj


def _set(*path_and_value):
    *path, key, value = path_and_value
    return lambda o: _in(o, *path).__setitem__(key, value)


MANAGED_BY = "the managedBy field value must be either"
IMMUTABLE_MANAGED_BY = "the managedBy field is immutable"
IMMUTABLE_BACKEND = "gcsFaultToleranceOptions.backend is immutable"
DELETION_STRATEGY = "deletionStrategy requires either BOTH onSuccess and onFailure"
LEGACY_AND_RULES = "legacy policies (onSuccess/onFailure) and deletionRules cannot be used together"
CONDITION_BOTH = "JobStatus and JobDeploymentStatus cannot be used together"
CONDITION_NEITHER = "the deletion condition requires either the JobStatus or the JobDeploymentStatus"
_GCS = ("gcsFaultToleranceOptions",)

# (derived object, mutation, the failing rule's schema path, its message); an update when
# `update` is set (old = the derived object), else a create.
MUTATIONS = {
    "RayService managedBy": ("RayService with managedBy and backend", _set("spec", "managedBy", "example.com/mine"),
                             "spec.managedBy", MANAGED_BY, False),
    "RayService cluster managedBy": ("RayService with managedBy and backend",
                                     _set("spec", "rayClusterConfig", "managedBy", "ray.io/kuberay"),
                                     "spec.rayClusterConfig.managedBy", MANAGED_BY, False),
    "RayCluster managedBy": ("RayCluster", _set("spec", "managedBy", ""), "spec.managedBy", MANAGED_BY, False),
    "RayJob managedBy": ("RayJob with deletionRules", _set("spec", "managedBy", "kueue"),
                         "spec.managedBy", MANAGED_BY, False),
    "RayJob cluster managedBy": ("RayJob with deletionRules", _set("spec", "rayClusterSpec", "managedBy", "x"),
                                 "spec.rayClusterSpec.managedBy", MANAGED_BY, False),
    "RayJob onSuccess only": ("RayJob with onSuccess/onFailure", lambda o: o["spec"]["deletionStrategy"].pop("onFailure"),
                              "spec.deletionStrategy", DELETION_STRATEGY, False),
    "RayJob empty deletionStrategy": ("RayJob with deletionRules", _set("spec", "deletionStrategy", {}),
                                      "spec.deletionStrategy", DELETION_STRATEGY, False),
    "RayJob legacy and deletionRules": ("RayJob with deletionRules",
                                        _set("spec", "deletionStrategy", "onSuccess", {"policy": "DeleteCluster"}),
                                        "spec.deletionStrategy", LEGACY_AND_RULES, False),
    "RayJob condition with both": ("RayJob with deletionRules",
                                   _set("spec", "deletionStrategy", "deletionRules", 0, "condition", "jobDeploymentStatus", "Failed"),
                                   "spec.deletionStrategy.deletionRules[*].condition", CONDITION_BOTH, False),
    "RayJob condition with neither": ("RayJob with deletionRules",
                                      _set("spec", "deletionStrategy", "deletionRules", 1, "condition", {"ttlSeconds": 30}),
                                      "spec.deletionStrategy.deletionRules[*].condition", CONDITION_NEITHER, False),
    "update: RayService managedBy": ("RayService with managedBy and backend",
                                     _set("spec", "managedBy", "kueue.x-k8s.io/multikueue"),
                                     "spec.managedBy", IMMUTABLE_MANAGED_BY, True),
    "update: RayService cluster managedBy": ("RayService with managedBy and backend",
                                             _set("spec", "rayClusterConfig", "managedBy", "ray.io/kuberay-operator"),
                                             "spec.rayClusterConfig.managedBy", IMMUTABLE_MANAGED_BY, True),
    "update: RayService backend": ("RayService with managedBy and backend",
                                   _set("spec", "rayClusterConfig", *_GCS, "backend", "rocksdb"),
                                   "spec.rayClusterConfig.gcsFaultToleranceOptions.backend", IMMUTABLE_BACKEND, True),
    "update: RayCluster managedBy": ("RayCluster", _set("spec", "managedBy", "ray.io/kuberay-operator"),
                                     "spec.managedBy", IMMUTABLE_MANAGED_BY, True),
    "update: RayCluster backend": ("RayCluster", _set("spec", *_GCS, "backend", "rocksdb"),
                                   "spec.gcsFaultToleranceOptions.backend", IMMUTABLE_BACKEND, True),
    "update: RayJob managedBy": ("RayJob with deletionRules", _set("spec", "managedBy", "kueue.x-k8s.io/multikueue"),
                                 "spec.managedBy", IMMUTABLE_MANAGED_BY, True),
    "update: RayJob cluster managedBy": ("RayJob with deletionRules",
                                         _set("spec", "rayClusterSpec", "managedBy", "ray.io/kuberay-operator"),
                                         "spec.rayClusterSpec.managedBy", IMMUTABLE_MANAGED_BY, True),
    "update: RayJob backend": ("RayJob with deletionRules", _set("spec", "rayClusterSpec", *_GCS, "backend", "rocksdb"),
                               "spec.rayClusterSpec.gcsFaultToleranceOptions.backend", IMMUTABLE_BACKEND, True),
}

# Rules no rendered object, derived object or mutation can reach, by Rule.key, with the reason.
UNREACHABLE: dict[tuple[str, str, str, int], str] = {}


def mutated(case: str) -> tuple[dict, dict | None, str, str]:
    base, mutate, path, message, update = MUTATIONS[case]
    original = derived_objects()[base]
    broken = copy.deepcopy(original)
    mutate(broken)
    return broken, (original if update else None), path, message


# -- tests -------------------------------------------------------------------------------------------
def test_every_rule_compiles():
    """cel-expr-python type-checks every rule (and messageExpression) in the CRD folder, with the
    CEL variables Kubernetes declares; a rule using a function it lacks fails here, named."""
    assert all_rules(), f"no x-kubernetes-validations in {CRD_DIR}"
    broken = []
    for rule in all_rules():
        try:
            compile_rule(rule.rule, rule.optional_old_self)
            if rule.message_expression:
                _ENVS["both"].compile(rule.message_expression)
        except RuntimeError as exc:
            broken.append(f"{rule}: {exc}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_custom_resource_passes_its_cel_rules(variant):
    objects = [o for o in rendered(variant) if crd_of(o) is not None]
    assert any(o["kind"] == "RayService" for o in objects)
    problems = []
    for obj in objects:
        crd = crd_of(obj)
        for old in (None, obj):  # a create, then an update to itself
            report = evaluate(obj, old)
            problems += [f"{'update' if old else 'create'} {obj['kind']} {obj['metadata']['name']}: {f}"
                         for f in report.failures]
            # Every rule of the CRD was evaluated or had a reason not to be.
            ours = {r.key for r in all_rules() if (r.crd, r.version) == (crd.crd, crd.version)}
            accounted = report.evaluated | report.absent | report.transition_skipped
            assert ours <= accounted, [r for r in all_rules() if r.key in ours - accounted]
            if old is None:
                transition = {r.key for r in all_rules() if compile_rule(r.rule, r.optional_old_self).transition
                              and not r.optional_old_self}
                assert not report.evaluated & transition, "a transition rule ran on a create"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["RayService with managedBy and backend", "RayCluster",
                                  "RayJob with deletionRules", "RayJob with onSuccess/onFailure"])
def test_derived_objects_pass_their_cel_rules_and_schema(name):
    obj = derived_objects()[name]
    assert not validation_errors(obj), validation_errors(obj)
    create, update = evaluate(obj), evaluate(obj, obj)
    assert not create.failures and not update.failures, [*map(str, create.failures), *map(str, update.failures)]
    assert create.evaluated, f"{name} reaches no rule"
    # An update to itself runs the transition rules a create skips, and they hold.
    assert create.transition_skipped and create.transition_skipped <= update.passed


@pytest.mark.parametrize("case", MUTATIONS)
def test_a_broken_object_is_rejected_with_the_rules_message(case):
    broken, old, path, message = mutated(case)
    # The schema alone accepts it: the CEL rule is what rejects it.
    assert not validation_errors(broken), validation_errors(broken)
    failures = evaluate(broken, old).failures
    assert len(failures) == 1 and failures[0].rule.path == path, [str(f) for f in failures]
    assert message in failures[0].message, str(failures[0])
    assert failures[0].message == failures[0].rule.message  # the CRD's message, verbatim
    # A transition rule is not evaluated on a create: the same object is accepted as new.
    if old is not None:
        assert not evaluate(broken).failures


def test_a_transition_rule_needs_an_old_value_at_its_place():
    """Setting managedBy on an update where it was unset is not a change of it: the API server
    evaluates `self == oldSelf` only where the old object has a value."""
    new = derived_objects()["RayCluster"]
    old = copy.deepcopy(new)
    del old["spec"]["managedBy"]
    report = evaluate(new, old)
    immutable = next(r for r in all_rules() if r.kind == "RayCluster" and r.path == "spec.managedBy"
                     and r.rule == "self == oldSelf")
    assert not report.failures and immutable.key in report.transition_skipped
    assert immutable.key not in report.evaluated
    assert immutable.key in evaluate(new, new).evaluated


def test_rules_on_absent_fields_are_not_evaluated():
    job = derived_objects()["RayJob with deletionRules"]
    del job["spec"]["deletionStrategy"]
    report = evaluate(job)
    strategy = {r.key for r in all_rules() if r.kind == "RayJob" and r.path.startswith("spec.deletionStrategy")}
    assert len(strategy) == 4 and strategy <= report.absent and not strategy & report.evaluated
    assert not report.failures


def test_every_rule_is_evaluated_and_rejects_something():
    """Each rule in the CRD folder holds on some valid object (rendered or derived) and rejects
    one of the mutations, or is listed in UNREACHABLE with the reason; a rule a new CRD version
    adds fails here until it is. Rules where the evaluator never looks (under allOf, ...) too."""
    held, rejected = set(), set()
    valid = [o for v in VARIANTS for o in rendered(v) if crd_of(o) is not None] + list(derived_objects().values())
    for obj in valid:
        for old in (None, obj):
            report = evaluate(obj, old)
            assert not report.failures
            held |= report.passed
    for case in MUTATIONS:
        broken, old, _, _ = mutated(case)
        rejected |= {f.rule.key for f in evaluate(broken, old).failures}
    keys = {r.key: r for r in all_rules()}
    assert set(UNREACHABLE) <= set(keys), f"UNREACHABLE lists rules the CRDs do not have: {set(UNREACHABLE) - set(keys)}"
    assert not set(UNREACHABLE) & (held | rejected), "a rule listed UNREACHABLE is reached"
    missing = [f"{r}: {'held nowhere' if k not in held else ''} {'rejected nothing' if k not in rejected else ''}"
               for k, r in keys.items() if k not in UNREACHABLE and not (k in held and k in rejected)]
    assert not missing, "\n".join(missing)


# -- the evaluator's semantics, on schemas of its own ---------------------------------------------
def _schema(**spec_properties) -> CRDVersion:
    schema = {"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": spec_properties}}}
    return CRDVersion("test.yaml", "example.com/v1", "Widget", schema)


def _widget(**spec) -> dict:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w", "namespace": "n"}, "spec": spec}


def test_message_expression_message_and_default_message():
    crd = _schema(size={"type": "integer", "x-kubernetes-validations": [
        {"rule": "self < 10", "messageExpression": "'size ' + string(self) + ' is 10 or more'", "message": "too big"},
        {"rule": "self < 20", "messageExpression": "self.nosuchfield", "message": "far too big"},
        {"rule": "self < 30"},
    ]})
    assert [f.message for f in evaluate_schema(crd, _widget(size=5)).failures] == []
    assert [f.message for f in evaluate_schema(crd, _widget(size=42)).failures] == [
        "size 42 is 10 or more", "far too big", "failed rule: self < 30"]


def test_root_rules_see_name_only_and_numbers_are_doubles_and_defaults_apply():
    crd = _schema(ratio={"type": "number"}, ttl={"type": "integer", "default": 7})
    crd.schema["properties"]["spec"]["properties"]["x-y"] = {"type": "string"}
    crd.schema["x-kubernetes-validations"] = [
        {"rule": "self.metadata.name == 'w' && !has(self.metadata.namespace)"},
        {"rule": "type(self.spec.ratio) == double && self.spec.ttl == 7 && self.spec.x__dash__y == 'z'"},
    ]
    report = evaluate_schema(crd, _widget(ratio=2, **{"x-y": "z"}))
    assert not report.failures and len(report.passed) == 2, [str(f) for f in report.failures]
    assert evaluate_schema(crd, _widget(ratio=2, ttl=8, **{"x-y": "z"})).failures


def test_transition_rules_correlate_through_map_lists_only():
    immutable = {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "immutable"}]}
    item = {"type": "object", "properties": {"name": {"type": "string"}, "value": immutable}}
    crd = _schema(keyed={"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                         "items": item},
                  plain={"type": "array", "items": item},
                  optional={"type": "string", "x-kubernetes-validations": [
                      {"rule": "!oldSelf.hasValue() || oldSelf.value() == self", "optionalOldSelf": True,
                       "message": "optional immutable"}]})
    old = _widget(keyed=[{"name": "a", "value": "1"}, {"name": "b", "value": "2"}],
                  plain=[{"name": "a", "value": "1"}], optional="x")
    # Reordered map-list items correlate by key: no change. Items of a plain list never correlate.
    new = _widget(keyed=[{"name": "b", "value": "2"}, {"name": "a", "value": "1"}],
                  plain=[{"name": "a", "value": "changed"}], optional="x")
    assert not evaluate_schema(crd, new, old).failures
    new["spec"]["keyed"][1]["value"] = "changed"
    new["spec"]["optional"] = "y"
    assert [f.message for f in evaluate_schema(crd, new, old).failures] == ["immutable", "optional immutable"]
    # optionalOldSelf rules run on a create too, with oldSelf empty.
    create = evaluate_schema(crd, new)
    assert not create.failures and (crd.crd, crd.version, "spec.optional", 0) in create.passed
