"""What a container run by the test kubelet sees: its environment, its volumes, its paths.

Values come from the API the way a kubelet resolves them (literal values with ``$(VAR)``
expansion, ``envFrom``, ``secretKeyRef``, ``configMapKeyRef``, downward-API ``fieldRef`` and
``resourceFieldRef``). A reference that cannot be resolved raises :class:`ConfigError`, which the
kubelet reports as ``CreateContainerConfigError`` and retries.

Processes share the host's filesystem, so container paths are mapped to per-pod directories: each
volume mount, the termination-message file and ``/tmp``. The mapping is applied by rewriting
mapped paths wherever they appear as a path in env values, command words, arguments and the
working directory (see :class:`PathMap`). Pass paths to a pod through env or args and they land
in the pod's directory; a path the program builds itself from other pieces is not rewritten.

There is no cluster DNS either. Every pod runs on this host, so the one name a pod can need for a
peer, a pod record of its own headless Service (``<hostname>.<subdomain>``, optionally followed by
``.<namespace>.svc[.cluster.local]``), is rewritten to the pod address where it is an env value
(see :func:`resolve_peer`).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

POD_IP = "127.0.0.1"
HOST_IP = "127.0.0.1"


class ConfigError(Exception):
    """A reference in the pod spec cannot be resolved right now (the kubelet retries)."""


# --- paths


# A container path is rewritten where it starts a path: at the start of a string or after a
# space, quote, '=', ':', ',', '(' or '[', and followed by the end, '/', or such a delimiter. That
# catches `--out=/data/x`, `echo x > /dev/termination-log` and `open('/tmp/y')`, not `s3://b/data`.
_BEFORE = r"(?:^|(?<=[\s=:'\"(,\[]))"
_AFTER = r"(?=$|[/\s'\"),\];:])"


@dataclass(frozen=True)
class PathMap:
    """Container path -> host path; the longest container path wins where mounts nest."""

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, Path]) -> PathMap:
        items = sorted(((c.rstrip("/") or "/", str(h)) for c, h in mapping.items()), key=lambda p: -len(p[0]))
        return cls(tuple(items))

    def rewrite(self, value: str) -> str:
        """Replace every mapped container path in ``value`` by its host path, in one pass.

        One pass matters: a host path (under /tmp, say) must not be rewritten again by another mapping.
        """
        if not self.pairs:
            return value
        hosts = dict(self.pairs)
        alternatives = "|".join(re.escape(c) for c, _ in self.pairs)
        pattern = re.compile(f"{_BEFORE}(?:{alternatives}){_AFTER}")
        return pattern.sub(lambda m: hosts[m.group(0)], value)


# --- cluster DNS, for a pod's peers


def resolve_peer(value: str, pod: k8s.V1Pod) -> str:
    """``value`` as the pod's address when it names a pod of the pod's own subdomain, else unchanged."""
    subdomain, namespace = pod.spec.subdomain, pod.metadata.namespace
    if not subdomain:
        return value
    suffix = rf"(?:\.{re.escape(namespace)}(?:\.svc(?:\.cluster\.local)?)?)?"
    peer = re.fullmatch(rf"[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(subdomain)}{suffix}", value)
    return POD_IP if peer else value


# --- $(VAR) expansion, as the kubelet does for env values, command and args

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(NAME)`` becomes env[NAME] when defined (else stays as written); ``$$`` escapes a ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, value)


# --- env


class Lookups:
    """Reads Secrets and ConfigMaps of one namespace, once each per resolution."""

    def __init__(self, core: k8s.CoreV1Api, namespace: str) -> None:
        self._core = core
        self._namespace = namespace
        self._secrets: dict[str, dict[str, str] | None] = {}
        self._config_maps: dict[str, dict[str, str] | None] = {}

    @property
    def namespace(self) -> str:
        return self._namespace

    def secret(self, name: str) -> dict[str, str] | None:
        if name not in self._secrets:
            self._secrets[name] = self._read(self._core.read_namespaced_secret, name, _decode_secret)
        return self._secrets[name]

    def config_map(self, name: str) -> dict[str, str] | None:
        if name not in self._config_maps:
            self._config_maps[name] = self._read(self._core.read_namespaced_config_map, name, _config_map_data)
        return self._config_maps[name]

    def token(self, pod: k8s.V1Pod, *, audience: str | None, expiration_seconds: int | None) -> str:
        """A token for the pod's ServiceAccount, bound to the pod, from the TokenRequest API."""
        request = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(
                audiences=[audience] if audience else [],
                expiration_seconds=expiration_seconds,
                bound_object_ref=k8s.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        account = pod.spec.service_account_name or "default"
        try:
            response = self._core.create_namespaced_service_account_token(account, self._namespace, request)
        except ApiException as e:
            if e.status == 404:
                raise ConfigError(f'serviceaccount "{account}" not found') from e
            raise
        return str(response.status.token)

    def _read(
        self, reader: Callable[..., object], name: str, convert: Callable[[object], dict[str, str]]
    ) -> dict[str, str] | None:
        try:
            return convert(reader(name, self._namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise


def _decode_secret(secret: object) -> dict[str, str]:
    data = getattr(secret, "data", None) or {}
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}


def _config_map_data(config_map: object) -> dict[str, str]:
    return dict(getattr(config_map, "data", None) or {})


def _not_found(kind: str, name: str) -> ConfigError:
    # The kubelet's wording: 'secret "x" not found', 'configmap "x" not found'.
    return ConfigError(f'{kind.lower()} "{name}" not found')


def _key_ref(kind: str, ref: k8s.V1SecretKeySelector | k8s.V1ConfigMapKeySelector, lookups: Lookups) -> str | None:
    """A key of a Secret/ConfigMap, None for an optional miss, ConfigError for a required one."""
    source = lookups.secret(ref.name) if kind == "Secret" else lookups.config_map(ref.name)
    if source is None:
        if ref.optional:
            return None
        raise _not_found(kind, ref.name)
    if ref.key not in source:
        if ref.optional:
            return None
        raise ConfigError(f"couldn't find key {ref.key} in {kind} {lookups.namespace}/{ref.name}")
    return source[ref.key]


def field_value(pod: k8s.V1Pod, path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath``."""
    meta = pod.metadata
    simple: dict[str, Callable[[], str | None]] = {
        "metadata.name": lambda: meta.name,
        "metadata.namespace": lambda: meta.namespace,
        "metadata.uid": lambda: meta.uid,
        "spec.nodeName": lambda: pod.spec.node_name,
        "spec.serviceAccountName": lambda: pod.spec.service_account_name,
        "status.hostIP": lambda: HOST_IP,
        "status.hostIPs": lambda: HOST_IP,
        "status.podIP": lambda: POD_IP,
        "status.podIPs": lambda: POD_IP,
    }
    if path in simple:
        return simple[path]() or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        values = (meta.labels if match.group(1) == "labels" else meta.annotations) or {}
        return str(values.get(match.group(2), ""))
    raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")


def resource_value(container: k8s.V1Container, ref: k8s.V1ResourceFieldSelector, allocatable: Mapping[str, str]) -> str:
    """A ``resourceFieldRef``: the container's limit (else the node's allocatable) over the divisor, rounded up."""
    kind, _, resource = ref.resource.partition(".")
    resources = container.resources
    values = (resources.limits if kind == "limits" else resources.requests) if resources else None
    quantity = (values or {}).get(resource) or allocatable.get(resource, "0")
    divisor = parse_quantity(ref.divisor or "1")
    return str(math.ceil(parse_quantity(quantity) / divisor))


def container_env(
    pod: k8s.V1Pod,
    container: k8s.V1Container,
    *,
    lookups: Lookups,
    base: Mapping[str, str],
    allocatable: Mapping[str, str],
) -> dict[str, str]:
    """``base`` overlaid with ``envFrom`` and then ``env``, each value expanded against what precedes it."""
    env = dict(base)
    for source in container.env_from or ():
        env.update(_env_from(source, lookups))
    for var in container.env or ():
        value = _env_value(pod, container, var, lookups=lookups, env=env, allocatable=allocatable)
        if value is not None:
            env[var.name] = value
    return env


def _env_from(source: k8s.V1EnvFromSource, lookups: Lookups) -> dict[str, str]:
    prefix = source.prefix or ""
    ref: k8s.V1SecretEnvSource | k8s.V1ConfigMapEnvSource | None = source.secret_ref or source.config_map_ref
    if ref is None:
        raise ConfigError("envFrom: neither secretRef nor configMapRef")
    kind = "Secret" if source.secret_ref is not None else "ConfigMap"
    values = lookups.secret(str(ref.name)) if kind == "Secret" else lookups.config_map(str(ref.name))
    if values is None:
        if ref.optional:
            return {}
        raise _not_found(kind, str(ref.name))
    return {prefix + k: v for k, v in values.items()}


def _env_value(
    pod: k8s.V1Pod,
    container: k8s.V1Container,
    var: k8s.V1EnvVar,
    *,
    lookups: Lookups,
    env: Mapping[str, str],
    allocatable: Mapping[str, str],
) -> str | None:
    source = var.value_from
    if source is None:
        return expand(var.value or "", env)
    if source.secret_key_ref is not None:
        return _key_ref("Secret", source.secret_key_ref, lookups)
    if source.config_map_key_ref is not None:
        return _key_ref("ConfigMap", source.config_map_key_ref, lookups)
    if source.field_ref is not None:
        return field_value(pod, source.field_ref.field_path)
    if source.resource_field_ref is not None:
        return resource_value(container, source.resource_field_ref, allocatable)
    raise ConfigError(f"env {var.name}: unsupported valueFrom")


# --- volumes


def prepare_volumes(pod: k8s.V1Pod, *, pod_dir: Path, claims_dir: Path, lookups: Lookups) -> dict[str, Path]:
    """Materialize the pod's volumes as host directories, by volume name.

    emptyDir: a fresh directory. configMap / secret / downwardAPI / projected (including the
    service-account token the admission plugin adds, from the TokenRequest API): their content
    written as files. A persistentVolumeClaim: one directory per claim, shared by every pod that
    mounts it and kept across pods. Any other kind raises ConfigError (the pod waits in
    ContainerCreating).
    """
    volumes: dict[str, Path] = {}
    for volume in pod.spec.volumes or ():
        host = pod_dir / "volumes" / volume.name
        host.mkdir(parents=True, exist_ok=True)
        if volume.config_map is not None:
            cm = volume.config_map
            _write_keys(host, "ConfigMap", cm.name, cm.items, cm.optional, lookups.config_map(cm.name))
        elif volume.secret is not None:
            sec = volume.secret
            _write_keys(host, "Secret", sec.secret_name, sec.items, sec.optional, lookups.secret(sec.secret_name))
        elif volume.downward_api is not None:
            _write_downward(host, pod, volume.downward_api.items)
        elif volume.projected is not None:
            for source in volume.projected.sources or ():
                _write_projection(host, pod, source, lookups)
        elif volume.persistent_volume_claim is not None:
            host = claims_dir / pod.metadata.namespace / volume.persistent_volume_claim.claim_name
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o777)
        elif volume.empty_dir is not None:
            host.chmod(0o777)  # as a kubelet makes an emptyDir: writable by whatever user the container runs as
        else:
            raise ConfigError(f"volume {volume.name}: the test kubelet does not support this volume type")
        volumes[volume.name] = host
    return volumes


def _write_projection(directory: Path, pod: k8s.V1Pod, source: k8s.V1VolumeProjection, lookups: Lookups) -> None:
    if source.service_account_token is not None:
        token = source.service_account_token
        value = lookups.token(pod, audience=token.audience, expiration_seconds=token.expiration_seconds)
        _write_files(directory, {token.path: value})
    elif source.config_map is not None:
        cm = source.config_map
        _write_keys(directory, "ConfigMap", cm.name, cm.items, cm.optional, lookups.config_map(cm.name))
    elif source.secret is not None:
        sec = source.secret
        _write_keys(directory, "Secret", sec.name, sec.items, sec.optional, lookups.secret(sec.name))
    elif source.downward_api is not None:
        _write_downward(directory, pod, source.downward_api.items)
    # Other projections (clusterTrustBundle, podCertificate) are left out: nothing here uses them.


def _write_downward(directory: Path, pod: k8s.V1Pod, items: list[k8s.V1DownwardAPIVolumeFile] | None) -> None:
    files = {}
    for item in items or ():
        if item.field_ref is None:
            raise ConfigError(f"downwardAPI {item.path}: only fieldRef is supported here")
        files[item.path] = field_value(pod, item.field_ref.field_path)
    _write_files(directory, files)


def _write_keys(
    directory: Path,
    kind: str,
    name: str,
    items: list[k8s.V1KeyToPath] | None,
    optional: bool | None,
    values: dict[str, str] | None,
) -> None:
    if values is None:
        if not optional:
            raise _not_found(kind, name)
        values = {}
    _write_files(directory, {item.path: values[item.key] for item in items if item.key in values} if items else values)


def _write_files(directory: Path, files: Mapping[str, str]) -> None:
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def mount_map(container: k8s.V1Container, volumes: Mapping[str, Path]) -> dict[str, Path]:
    """The container's mountPath -> host directory (honouring subPath)."""
    mounts: dict[str, Path] = {}
    for mount in container.volume_mounts or ():
        host = volumes[mount.name]
        if mount.sub_path:
            host = host / mount.sub_path
            host.mkdir(parents=True, exist_ok=True)
        mounts[mount.mount_path] = host
    return mounts


# --- a container under podman


def run_as(pod: k8s.V1Pod, container: k8s.V1Container, image_user: str) -> tuple[str, list[str]]:
    """The ``--user`` value and the extra groups of a container, checked as a kubelet checks runAsNonRoot.

    The container's securityContext wins over the pod's. With runAsNonRoot and no runAsUser, the
    image's USER must be numeric and not 0 (a name cannot be verified), as the kubelet requires.
    """
    pod_context = pod.spec.security_context or k8s.V1PodSecurityContext()
    own = container.security_context or k8s.V1SecurityContext()
    uid = own.run_as_user if own.run_as_user is not None else pod_context.run_as_user
    gid = own.run_as_group if own.run_as_group is not None else pod_context.run_as_group
    non_root = own.run_as_non_root if own.run_as_non_root is not None else pod_context.run_as_non_root
    if non_root:
        if uid is None:
            name = image_user.split(":", 1)[0]
            if not name.isdigit() and name:
                why = f"image has non-numeric user ({name}), cannot verify user is non-root"
                raise ConfigError(f"container has runAsNonRoot and {why}")
            if not name or int(name) == 0:
                raise ConfigError("container has runAsNonRoot and image will run as root")
        elif uid == 0:
            raise ConfigError("container's runAsUser breaks non-root policy")
    user = image_user or "0"
    if uid is not None:
        user = f"{uid}:{gid}" if gid is not None else str(uid)
    elif gid is not None:
        user = f"{user.split(':', 1)[0]}:{gid}"
    groups = [*(pod_context.supplemental_groups or ()), *([pod_context.fs_group] if pod_context.fs_group else ())]
    return user, [str(g) for g in groups]


def security_args(pod: k8s.V1Pod, container: k8s.V1Container) -> list[str]:
    """Root filesystem, capabilities, privilege escalation and seccomp, as podman flags."""
    own = container.security_context or k8s.V1SecurityContext()
    pod_context = pod.spec.security_context or k8s.V1PodSecurityContext()
    args: list[str] = []
    if own.privileged:
        args.append("--privileged")
    if own.read_only_root_filesystem:
        # podman would otherwise add writable tmpfs mounts (/tmp, /var/tmp, /run) a kubelet never adds.
        args += ["--read-only", "--read-only-tmpfs=false"]
    capabilities = own.capabilities or k8s.V1Capabilities()
    args += [f"--cap-drop={c.lower()}" for c in capabilities.drop or ()]
    args += [f"--cap-add={c.lower()}" for c in capabilities.add or ()]
    if own.allow_privilege_escalation is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = own.seccomp_profile or pod_context.seccomp_profile
    if seccomp is not None and seccomp.type == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    # RuntimeDefault (or unset, as containerd runs it under the restricted standard) is podman's default profile.
    return args


def limit_args(container: k8s.V1Container) -> list[str]:
    """``resources.limits`` memory and cpu as cgroup limits (no swap beyond the memory limit, as a kubelet sets)."""
    limits = (container.resources.limits if container.resources else None) or {}
    args: list[str] = []
    if "memory" in limits:
        memory = int(parse_quantity(limits["memory"]))
        args += [f"--memory={memory}b", f"--memory-swap={memory}b"]
    if "cpu" in limits:
        args.append(f"--cpus={float(parse_quantity(limits['cpu'])):g}")
    return args


def mount_args(pod: k8s.V1Pod, container: k8s.V1Container, volumes: Mapping[str, Path]) -> list[str]:
    """Each volumeMount as a bind mount of its host directory; an emptyDir of medium Memory as a tmpfs.

    A Memory emptyDir is one tmpfs per container here (a kubelet shares one between a pod's
    containers); its sizeLimit becomes the tmpfs size, and its pages count against the container's memory.
    """
    memory = {v.name: v.empty_dir for v in pod.spec.volumes or () if v.empty_dir and v.empty_dir.medium == "Memory"}
    hosts = mount_map(container, volumes)
    args: list[str] = []
    for mount in container.volume_mounts or ():
        if mount.name in memory:
            size = memory[mount.name].size_limit
            options = ["type=tmpfs", f"destination={mount.mount_path}", "tmpfs-mode=1777"]
            options += [f"tmpfs-size={int(parse_quantity(size))}"] if size else []
            args += ["--mount", ",".join(options)]
        else:
            mode = "ro" if mount.read_only else "rw"
            args += ["--volume", f"{hosts[mount.mount_path]}:{mount.mount_path}:{mode}"]
    return args


def podman_args(
    pod: k8s.V1Pod,
    container: k8s.V1Container,
    *,
    env: Mapping[str, str],
    volumes: Mapping[str, Path],
    message_path: Path,
    image_user: str,
) -> list[str]:
    """The ``podman create`` arguments that run ``container`` of ``pod`` as a kubelet would.

    Host network (the pod's address is the host's, as in process mode), the pod's securityContext
    (:func:`run_as`, :func:`security_args`), limits (:func:`limit_args`), volumes (:func:`mount_args`),
    the termination-message file, the resolved env, and the image's ENTRYPOINT/CMD combined with
    ``command`` and ``args`` the way a runtime does.
    """
    user, groups = run_as(pod, container, image_user)
    args = ["--network", "host", "--label", f"kubetune.testbed.pod={pod.metadata.uid}"]
    args += ["--user", user, *[f"--group-add={g}" for g in groups]]
    args += security_args(pod, container) + limit_args(container) + mount_args(pod, container, volumes)
    message = container.termination_message_path or "/dev/termination-log"
    args += ["--volume", f"{message_path}:{message}:rw"]
    args += [x for k, v in env.items() for x in ("--env", f"{k}={v}")]
    if container.working_dir:
        args += ["--workdir", container.working_dir]
    words = [expand(w, env) for w in container.args or ()]
    if container.command:
        args += ["--entrypoint", json.dumps([expand(w, env) for w in container.command])]
    return [*args, container.image, *words]
