"""Offline wheelhouse for an air-gapped GPU environment (megatron-core + TransformerEngine [+ vLLM]).

Run on any machine with PyPI access (a login node, a laptop): for each requirement that the target
image does not already satisfy (per its `pip list --format=freeze`), `pip download --no-deps` fetches
the wheel for the *target* interpreter and platform (not this one), its Requires-Dist is read from
the wheel and followed, level by level. Packages that must be compiled on the GPU node
(transformer_engine_torch) are fetched as sdists straight from the index: `pip download` of that
sdist would install a CUDA torch into a build environment just to read its metadata.

The output directory holds files/ (wheels, sdists, or their parts when --split-mb is given),
manifest.json, SHA256SUMS and install.sh, which reassembles, verifies, installs offline, builds the
sdists with --no-build-isolation and runs an import check.

Only the standard library, pip and `packaging` are needed, so this runs on a bare login node.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.parser import HeaderParser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare login-node Python: pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import (  # type: ignore[no-redef]
        canonicalize_name,
        parse_sdist_filename,
        parse_wheel_filename,
    )
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

MEGATRON_CORE = "megatron-core==0.19.2"
TRANSFORMER_ENGINE = "transformer-engine[core_cu13,pytorch]==2.20.2"
VLLM = "vllm==0.26.0"
# Measured for vllm 0.26.0 (what pip's own resolver settles on): the newest xgrammar and quack-kernels
# need an apache-tvm-ffi / nvidia-cutlass-dsl newer than vllm's exact pins, and this walk does not
# backtrack.
VLLM_CONSTRAINTS = ("xgrammar<=0.2.7", "quack-kernels<=0.6.3")


@dataclass(frozen=True)
class Override:
    """A version installed whatever the requirements on it say (uv's override-dependencies): the walk
    fetches exactly this one, and each requirement it breaks is recorded and announced, not a conflict."""

    requirement: str  # "name==version"
    reason: str

    @property
    def name(self) -> str:
        return canonicalize_name(Requirement(self.requirement).name)

    @property
    def specifier(self) -> SpecifierSet:
        return Requirement(self.requirement).specifier


# TE 2.20.2 and vLLM 0.26.0 in one environment. transformer_engine_torch needs nvidia-cudnn-frontend
# >= 1.29.0, and every such release needs nvidia-cutlass-dsl >= 4.8.0 and apache-tvm-ffi >= 0.1.11,
# which vLLM pins to 4.6.0 and 0.1.10. Measured on an H200 (2026-12-03, docs/wheelhouse.md): with
# these three versions vLLM imports and generates, and a TE FP8 forward + backward runs in the same
# process; pip check then names exactly the two requirements of cudnn-frontend below.
VLLM_TE_OVERRIDES = (
    Override(
        "nvidia-cudnn-frontend==1.32.0",
        "transformer_engine_torch 2.20.2 needs >=1.29.0; 1.32.0 is what TE alone resolves to",
    ),
    Override("nvidia-cutlass-dsl==4.6.0", "vllm 0.26.0 pins it exactly"),
    Override("apache-tvm-ffi==0.1.10", "vllm 0.26.0 pins it exactly"),
)
DEFAULT_REQUIREMENTS = (MEGATRON_CORE, TRANSFORMER_ENGINE)
DEFAULT_IMPORT_CHECK = ("transformer_engine.pytorch", "megatron.core")
# Compiled against the node's torch and CUDA; there is no wheel on PyPI.
DEFAULT_SOURCE_ONLY = frozenset({"transformer-engine-torch"})
# Never replaced from the wheelhouse, even when a requirement asks for another version: the image's
# CUDA build of torch is the whole point of the image (NGC ships e.g. torch 2.6.0a0+git...).
DEFAULT_KEEP_IMAGE = frozenset({"torch", "torchvision", "torchaudio", "triton", "pytorch-triton"})
DEFAULT_INDEX_URL = "https://pypi.org/simple"
SDIST_SUFFIXES = (".tar.gz", ".zip")
PART_SUFFIX_DIGITS = 3


# ---------------------------------------------------------------------------------------------
# Target environment and package index
# ---------------------------------------------------------------------------------------------


def manylinux_platforms(arch: str = "x86_64", max_glibc: tuple[int, int] = (2, 35)) -> tuple[str, ...]:
    """Every manylinux tag a glibc-max_glibc system accepts, newest first (pip does not expand them)."""
    major, newest = max_glibc
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    for minor, alias in legacy.items():
        if minor <= newest and (alias != "manylinux2010" or arch in ("x86_64", "i686")):
            tags.insert(tags.index(f"manylinux_{major}_{minor}_{arch}") + 1, f"{alias}_{arch}")
    return tuple(tags)


@dataclass(frozen=True)
class TargetEnv:
    """The interpreter and platform the wheels are for (the GPU node), not the one running this."""

    python_version: str = "3.12"
    arch: str = "x86_64"
    max_glibc: tuple[int, int] = (2, 35)

    @property
    def platforms(self) -> tuple[str, ...]:
        return manylinux_platforms(self.arch, self.max_glibc)

    @property
    def abi(self) -> str:
        major, minor = self.python_version.split(".")[:2]
        return f"cp{major}{minor}"

    def pip_args(self) -> list[str]:
        args = ["--python-version", self.python_version, "--implementation", "cp"]
        for abi in (self.abi, "abi3", "none"):
            args += ["--abi", abi]
        for platform in self.platforms:
            args += ["--platform", platform]
        return args

    def marker_environment(self) -> dict[str, str]:
        parts = (self.python_version.split(".") + ["0", "0"])[:3]
        return {
            "python_version": ".".join(parts[:2]),
            "python_full_version": ".".join(parts),
            "implementation_name": "cpython",
            "implementation_version": ".".join(parts),
            "platform_python_implementation": "CPython",
            "os_name": "posix",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": self.arch,
            "platform_release": "",
            "platform_version": "",
        }


@functools.cache
def pip_setting(key: str) -> str | None:
    """A pip option as pip itself would see it: $PIP_<KEY>, else `pip config get global.<key>`."""
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        return env
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True, text=True
    )
    value = result.stdout.strip()
    return value if result.returncode == 0 and value else None


@dataclass(frozen=True)
class IndexOptions:
    """Where packages come from; None fields fall back to the user's pip configuration."""

    index_url: str | None = None
    find_links: tuple[Path, ...] = ()
    no_index: bool = False
    quiet: bool = False

    def pip_args(self) -> list[str]:
        args = ["--no-index"] if self.no_index else []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for folder in self.find_links:
            args += ["--find-links", str(folder)]
        return args + (["--quiet"] if self.quiet else [])

    def resolved_index_url(self) -> str:
        return self.index_url or pip_setting("index-url") or DEFAULT_INDEX_URL

    def all_find_links(self) -> list[Path]:
        configured = (pip_setting("find-links") or "").split()
        return [*self.find_links, *(Path(p) for p in configured if "://" not in p or p.startswith("file:"))]


# ---------------------------------------------------------------------------------------------
# Freeze list and distribution metadata
# ---------------------------------------------------------------------------------------------

_FREEZE_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:===?\s*([^\s;#]+)|@\s*\S+)")


def parse_freeze(text: str) -> dict[str, str | None]:
    """Canonical name -> version from `pip list --format=freeze` / `pip freeze` (None: a direct URL)."""
    installed: dict[str, str | None] = {}
    for line in text.splitlines():
        match = _FREEZE_LINE.match(line.strip())
        if match:
            installed[canonicalize_name(match.group(1))] = match.group(2)
    return installed


def _metadata_text(dist_file: Path) -> str:
    name = dist_file.name
    if name.endswith(".whl"):
        with zipfile.ZipFile(dist_file) as archive:
            member = next(m for m in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", m))
            return archive.read(member).decode("utf-8")
    if name.endswith(".tar.gz"):
        with tarfile.open(dist_file) as archive:
            member = next(m for m in archive.getnames() if re.fullmatch(r"[^/]+/PKG-INFO", m))
            return archive.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    if name.endswith(".zip"):
        with zipfile.ZipFile(dist_file) as archive:
            member = next(m for m in archive.namelist() if re.fullmatch(r"[^/]+/PKG-INFO", m))
            return archive.read(member).decode("utf-8")
    raise ValueError(f"not a wheel or sdist: {dist_file}")


@dataclass(frozen=True)
class DistMetadata:
    name: str
    version: str
    requires_dist: tuple[str, ...]
    requires_python: str | None


def read_metadata(dist_file: Path) -> DistMetadata:
    """Core metadata of a wheel (.dist-info/METADATA) or an sdist (PKG-INFO, metadata >= 2.2)."""
    headers = HeaderParser().parsestr(_metadata_text(dist_file))
    return DistMetadata(
        name=headers["Name"],
        version=headers["Version"],
        requires_dist=tuple(headers.get_all("Requires-Dist") or ()),
        requires_python=headers.get("Requires-Python"),
    )


def active_requirements(
    requires_dist: Iterable[str], extras: Iterable[str], environment: dict[str, str], *, base: bool = True
) -> list[Requirement]:
    """Requires-Dist entries that hold on the target: the package's own (if base) and those its extras add."""
    extras = [e for e in extras if e]
    active = []
    for line in requires_dist:
        requirement = Requirement(line)
        marker = requirement.marker
        in_base = marker is None or marker.evaluate({**environment, "extra": ""})
        from_extra = not in_base and any(marker.evaluate({**environment, "extra": e}) for e in extras)
        if (base and in_base) or from_extra:
            active.append(requirement)
    return active


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dist_name_version(dist_file: Path) -> tuple[str, str]:
    if dist_file.name.endswith(".whl"):
        name, version, _, _ = parse_wheel_filename(dist_file.name)
    else:
        name, version = parse_sdist_filename(dist_file.name)
    return canonicalize_name(name), str(version)


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


class DownloadError(RuntimeError):
    pass


def _pip_download(specs: Sequence[str], dest: Path, target: TargetEnv, index: IndexOptions) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    cmd += target.pip_args() + index.pip_args() + list(specs)
    if subprocess.run(cmd).returncode != 0:
        raise DownloadError(f"pip download failed for {', '.join(specs)}")


def download_wheels(
    specs: dict[str, str], dest: Path, target: TargetEnv, index: IndexOptions
) -> tuple[dict[str, Path], list[str]]:
    """One pip call for all specs (name -> 'name[extras]specifier'); on failure, one call each.

    Returns the wheels by canonical name and the names that have no wheel for the target.
    """
    staging = Path(tempfile.mkdtemp(prefix="wheels-", dir=dest))
    try:
        _pip_download(list(specs.values()), staging, target, index)
        missing: list[str] = []
    except DownloadError:
        missing = []
        for name, spec in specs.items():
            try:
                _pip_download([spec], staging, target, index)
            except DownloadError:
                missing.append(name)
    found = {}
    for wheel in staging.glob("*.whl"):
        found[dist_name_version(wheel)[0]] = Path(shutil.move(wheel, dest / wheel.name))
    shutil.rmtree(staging)
    return found, missing


def _index_sdists(name: str, index_url: str) -> list[tuple[str, str, str | None]]:
    """(filename, url, sha256) of every non-yanked sdist of name, via the PEP 691 JSON simple API."""
    request = urllib.request.Request(
        f"{index_url.rstrip('/')}/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=120, context=_ssl_context()) as response:
        listing = json.load(response)
    return [
        (entry["filename"], entry["url"], entry.get("hashes", {}).get("sha256"))
        for entry in listing["files"]
        if entry["filename"].endswith(SDIST_SUFFIXES) and not entry.get("yanked")
    ]


def _ssl_context() -> ssl.SSLContext | None:
    cert = pip_setting("cert")
    return ssl.create_default_context(cafile=cert) if cert else None


_SdistChoice = tuple[Version, str, str, str | None]  # version, filename, location, sha256


def _best_sdist(
    candidates: Iterable[tuple[str, str, str | None]], specifier: SpecifierSet, name: str
) -> _SdistChoice | None:
    best: _SdistChoice | None = None
    for filename, location, sha in candidates:
        try:
            dist, version = parse_sdist_filename(filename)
        except (ValueError, InvalidVersion):
            continue
        if (
            canonicalize_name(dist) == name
            and specifier.contains(version)
            and (best is None or version > best[0])
        ):
            best = (version, filename, location, sha)
    return best


def fetch_sdist(name: str, specifier: SpecifierSet, dest: Path, index: IndexOptions) -> Path:
    """The newest sdist of name matching specifier: from find-links folders, else from the index."""
    local = [(p.name, str(p), None) for folder in index.all_find_links() for p in _folder_files(folder)]
    best = _best_sdist(local, specifier, name)
    if best is None and not index.no_index:
        best = _best_sdist(_index_sdists(name, index.resolved_index_url()), specifier, name)
    if best is None:
        raise DownloadError(f"no sdist of {name}{specifier} found")
    _, filename, location, expected_sha = best
    out = dest / filename
    if "://" in location:
        with urllib.request.urlopen(location, timeout=600, context=_ssl_context()) as response:
            with open(out, "wb") as handle:
                shutil.copyfileobj(response, handle, length=8 << 20)
    else:
        shutil.copyfile(location, out)
    if expected_sha and sha256_of(out) != expected_sha:
        out.unlink()
        raise DownloadError(f"sha256 mismatch for {filename} from {location}")
    return out


def _folder_files(folder: Path) -> list[Path]:
    folder = Path(str(folder).removeprefix("file://"))
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Resolution: walk Requires-Dist, skipping what the image already has
# ---------------------------------------------------------------------------------------------


@dataclass
class Artifact:
    name: str
    version: str
    file: str
    kind: str  # "wheel" | "sdist"
    sha256: str
    size: int
    required_by: list[str] = field(default_factory=list)
    replaces_image_version: str | None = None
    parts: list[dict] = field(default_factory=list)


@dataclass
class Edge:
    requirement: str
    parent: str


@dataclass
class Resolution:
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    from_image: dict[str, str | None] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)  # name -> the parents that wanted it
    overridden: list[dict] = field(default_factory=list)  # requirements an Override breaks, on purpose


@dataclass
class _Wanted:
    """All requirements on one package seen in one level of the walk."""

    specifier: SpecifierSet = field(default_factory=SpecifierSet)
    extras: set[str] = field(default_factory=set)
    parents: list[str] = field(default_factory=list)

    def spec_string(self, name: str) -> str:
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        return f"{name}{extras}{self.specifier}"


def _without_marker(requirement: Requirement) -> str:
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return f"{requirement.name}{extras}{requirement.specifier}"


def _satisfies(version: str | None, specifier: SpecifierSet) -> bool:
    if version is None:  # installed from a direct URL: trust it
        return True
    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


class WheelhouseResolver:
    """Breadth-first walk of Requires-Dist from the requirements, downloading what the image lacks."""

    def __init__(
        self,
        files_dir: Path,
        image: dict[str, str | None],
        target: TargetEnv,
        index: IndexOptions,
        *,
        source_only: Iterable[str] = DEFAULT_SOURCE_ONLY,
        keep_image: Iterable[str] = DEFAULT_KEEP_IMAGE,
        exclude: Iterable[str] = (),
        constraints: Iterable[str] = (),
        overrides: Iterable[Override] = (),
    ) -> None:
        self.files_dir = files_dir
        self.image = image
        self.target = target
        self.index = index
        self.source_only = {canonicalize_name(n) for n in source_only}
        self.keep_image = {canonicalize_name(n) for n in keep_image}
        self.exclude = {canonicalize_name(n) for n in exclude}
        self.constraints: dict[str, SpecifierSet] = defaultdict(SpecifierSet)
        for line in constraints:  # like pip's -c: narrows a package's versions wherever it is required
            constraint = Requirement(line)
            self.constraints[canonicalize_name(constraint.name)] &= constraint.specifier
        self.overrides = {override.name: override for override in overrides}
        self.environment = target.marker_environment()
        self.result = Resolution()
        self._followed: dict[str, set[str]] = defaultdict(set)  # extras followed; "" = own requirements
        self._metadata: dict[str, DistMetadata] = {}

    def resolve(self, requirements: Iterable[str]) -> Resolution:
        pending = [(Requirement(r), "<requested>") for r in requirements]
        while pending:
            pending = self._resolve_level(self._group(pending))
        self._check_edges()
        return self.result

    def _group(self, pending: list[tuple[Requirement, str]]) -> dict[str, _Wanted]:
        level: dict[str, _Wanted] = defaultdict(_Wanted)
        for requirement, parent in pending:
            wanted = level[canonicalize_name(requirement.name)]
            wanted.specifier &= requirement.specifier
            wanted.extras |= set(requirement.extras)
            wanted.parents.append(parent)
            self.result.edges.append(Edge(str(requirement), parent))
        for name, wanted in level.items():
            wanted.specifier &= self.constraints.get(name, SpecifierSet())
            if name in self.overrides:
                wanted.specifier = self.overrides[name].specifier
        return level

    def _resolve_level(self, level: dict[str, _Wanted]) -> list[tuple[Requirement, str]]:
        to_fetch = {name: wanted for name, wanted in level.items() if self._needs_download(name, wanted)}
        self._fetch(to_fetch)
        follow_up: list[tuple[Requirement, str]] = []
        for name, wanted in level.items():
            if name in self.result.artifacts:
                self.result.artifacts[name].required_by += [p for p in wanted.parents if p != "<requested>"]
            follow_up += self._dependencies_to_follow(name, wanted.extras)
        return follow_up

    def _needs_download(self, name: str, wanted: _Wanted) -> bool:
        if name in self.result.artifacts:
            return False  # a conflicting later requirement is reported by _check_edges
        if name in self.exclude:
            self.result.excluded.setdefault(name, []).extend(wanted.parents)
            return False
        if name in self.image and (name in self.keep_image or _satisfies(self.image[name], wanted.specifier)):
            self.result.from_image[name] = self.image[name]
            return False
        self.result.from_image.pop(name, None)
        return True

    def _fetch(self, wanted_by_name: dict[str, _Wanted]) -> None:
        wheels = {n: w.spec_string(n) for n, w in wanted_by_name.items() if n not in self.source_only}
        found, missing = (
            download_wheels(wheels, self.files_dir, self.target, self.index) if wheels else ({}, [])
        )
        sources = [n for n in wanted_by_name if n in self.source_only] + missing
        for name in missing:
            self.result.warnings.append(f"{name}: no wheel for the target platform, using its sdist")
        for name in sources:
            try:
                found[name] = fetch_sdist(name, wanted_by_name[name].specifier, self.files_dir, self.index)
            except DownloadError as error:
                wanted = wanted_by_name[name]
                raise DownloadError(
                    f"{wanted.spec_string(name)} (wanted by {', '.join(wanted.parents)}): no wheel for the "
                    f"target and no sdist: {error}"
                ) from error
        for name, path in found.items():
            self._record(name, path)

    def _record(self, name: str, path: Path) -> None:
        metadata = read_metadata(path)
        self._metadata[name] = metadata
        self.result.artifacts[name] = Artifact(
            name=canonicalize_name(metadata.name),
            version=metadata.version,
            file=path.name,
            kind="wheel" if path.name.endswith(".whl") else "sdist",
            sha256=sha256_of(path),
            size=path.stat().st_size,
            replaces_image_version=self.image.get(name) if name in self.image else None,
        )

    def _dependencies_to_follow(self, name: str, extras: set[str]) -> list[tuple[Requirement, str]]:
        """Requirements not yet followed: a downloaded package's own and its extras'; for a package the
        image provides, only what newly requested extras add (its own are the image's business)."""
        in_wheelhouse = name in self.result.artifacts
        keys = extras | ({""} if in_wheelhouse else set())
        new = keys - self._followed[name]
        if not new:
            return []
        metadata = self._metadata.get(name) if in_wheelhouse else self._image_metadata(name)
        if metadata is None:
            return []
        self._followed[name] |= new
        parent = f"{name}=={metadata.version}"
        requirements = active_requirements(metadata.requires_dist, new, self.environment, base="" in new)
        return [(requirement, parent) for requirement in requirements]

    def _image_metadata(self, name: str) -> DistMetadata | None:
        """Metadata of the image's version of a package, needed only to follow extras it was asked for."""
        version = self.image.get(name)
        if version is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            found, missing = download_wheels(
                {name: f"{name}=={version}"}, Path(scratch), self.target, self.index
            )
            if missing:
                self.result.warnings.append(f"{name}=={version}: metadata unavailable, extras not followed")
                return None
            return read_metadata(found[name])

    def _check_edges(self) -> None:
        for edge in self.result.edges:
            requirement = Requirement(edge.requirement)
            name = canonicalize_name(requirement.name)
            if name in self.exclude:
                continue
            if name in self.result.artifacts:
                have, where = self.result.artifacts[name].version, "wheelhouse"
            elif name in self.result.from_image:
                have, where = self.result.from_image[name], "image"
            else:
                continue
            if _satisfies(have, requirement.specifier):
                continue
            if name in self.overrides:
                self.result.overridden.append(
                    {
                        "parent": edge.parent,
                        "requirement": _without_marker(requirement),
                        "installed": f"{name}=={have}",
                        "reason": self.overrides[name].reason,
                    }
                )
            else:
                self.result.conflicts.append(f"{edge.parent} needs {requirement}, {where} has {name} {have}")


# ---------------------------------------------------------------------------------------------
# Output: split parts, checksums, manifest, install.sh
# ---------------------------------------------------------------------------------------------


def part_name(file_name: str, index: int) -> str:
    return f"{file_name}.part{index:0{PART_SUFFIX_DIGITS}d}"


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Replace path by path.part000, path.part001, ... of at most part_bytes each."""
    parts = []
    with open(path, "rb") as source:
        while chunk := source.read(part_bytes):
            part = path.with_name(part_name(path.name, len(parts)))
            part.write_bytes(chunk)
            parts.append(part)
    path.unlink()
    return parts


def reassemble_parts(folder: Path) -> list[Path]:
    """Join every <file>.part000.. group in folder back into <file> (what install.sh does in bash)."""
    joined = []
    for first in sorted(folder.glob(part_name("*", 0))):
        whole = first.with_name(first.name.removesuffix(part_name("", 0)))
        parts = sorted(folder.glob(f"{glob_escape(whole.name)}.part" + "[0-9]" * PART_SUFFIX_DIGITS))
        with open(whole, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        joined.append(whole)
    return joined


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def split_large_files(files_dir: Path, artifacts: Iterable[Artifact], split_mb: float) -> None:
    part_bytes = int(split_mb * 1024 * 1024)
    for artifact in artifacts:
        path = files_dir / artifact.file
        if artifact.size > part_bytes:
            artifact.parts = [
                {"file": part.name, "sha256": sha256_of(part), "size": part.stat().st_size}
                for part in split_file(path, part_bytes)
            ]


def write_sha256sums(out_dir: Path, artifacts: Iterable[Artifact]) -> Path:
    path = out_dir / "SHA256SUMS"
    path.write_text("".join(f"{a.sha256}  files/{a.file}\n" for a in artifacts))
    return path


def write_manifest(out_dir: Path, resolution: Resolution, settings: dict) -> Path:
    manifest = {
        "generator": "megatron_sdzero.wheelhouse",
        **settings,
        "files": [asdict(a) for a in resolution.artifacts.values()],
        "from_image": dict(sorted(resolution.from_image.items())),
        "conflicts": resolution.conflicts,
        "excluded": resolution.excluded,
        "overridden": resolution.overridden,
        "warnings": resolution.warnings,
        "total_bytes": sum(a.size for a in resolution.artifacts.values()),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def render_install_script(import_check: Sequence[str], no_deps: bool = False) -> str:
    """install.sh for this wheelhouse; no_deps=True when packages were excluded or requirements
    overridden on purpose, since pip's dependency check would then fail on the node."""
    for module in import_check:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", module):
            raise ValueError(f"not a module name: {module!r}")
    script = INSTALL_SCRIPT.replace("__IMPORT_CHECK__", " ".join(import_check))
    return script.replace("NO_DEPS=0\n", f"NO_DEPS={int(no_deps)}\n", 1)


INSTALL_SCRIPT = r"""#!/usr/bin/env bash
# Offline installer for this wheelhouse (made by megatron_sdzero.wheelhouse, tools/build_wheelhouse.py).
#
# Usage: bash install.sh [--target DIR] [--no-deps] [--verify-only] [--skip-build] [--keep-parts]
#   --target DIR   install into DIR (pip --target, implies --no-deps) instead of the active environment
#   --no-deps      install the wheels without pip's dependency check against the environment
#   --verify-only  reassemble split files and check their sha256 sums; install nothing
#   --skip-build   install the wheels only; do not build the sdists (transformer_engine_torch)
#   --keep-parts   keep the .partNNN files after reassembly
# Environment: PYTHON (python3), MAX_JOBS (16), NVTE_CUDA_ARCHS (90), PIP_INSTALL_ARGS (extra pip args)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FILES="$HERE/files"
PYTHON="${PYTHON:-python3}"
IMPORT_CHECK=(__IMPORT_CHECK__)
TARGET=""
NO_DEPS=0
VERIFY_ONLY=0
SKIP_BUILD=0
KEEP_PARTS=0

usage() { sed -n '4,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --target) TARGET="$(mkdir -p "$2" && cd "$2" && pwd)"; shift 2 ;;
    --no-deps) NO_DEPS=1; shift ;;
    --verify-only) VERIFY_ONLY=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --keep-parts) KEEP_PARTS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -n "$TARGET" ]]; then
  export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
shopt -s nullglob
# shellcheck disable=SC2206  # PIP_INSTALL_ARGS is a space-separated list of options on purpose
EXTRA_PIP_ARGS=(${PIP_INSTALL_ARGS:-})

log() { echo "[wheelhouse] $*"; }

reassemble() {
  local first whole
  for first in "$FILES"/*.part000; do
    whole="${first%.part000}"
    log "reassembling $(basename "$whole")"
    cat "$whole".part[0-9][0-9][0-9] > "$whole.joining"
    mv "$whole.joining" "$whole"
  done
}

verify() {
  log "verifying sha256 sums"
  if command -v sha256sum > /dev/null; then
    (cd "$HERE" && sha256sum --check --quiet SHA256SUMS)
  else
    (cd "$HERE" && shasum -a 256 --check --quiet SHA256SUMS)
  fi
}

remove_parts() {
  if (( KEEP_PARTS == 0 )); then
    rm -f "$FILES"/*.part[0-9][0-9][0-9]
  fi
}

install_wheels() {
  local wheels=("$FILES"/*.whl)
  local args=(--no-index --find-links "$FILES")
  if [[ -n "$TARGET" ]]; then
    args+=(--target "$TARGET" --upgrade --no-deps)
  elif (( NO_DEPS )); then
    args+=(--no-deps)
  fi
  if (( ${#wheels[@]} == 0 )); then
    log "no wheels to install"
    return 0
  fi
  log "installing ${#wheels[@]} wheels"
  "$PYTHON" -m pip install "${args[@]}" "${EXTRA_PIP_ARGS[@]}" "${wheels[@]}"
}

build_sdists() {
  local sdist
  local args=(--no-index --find-links "$FILES" --no-build-isolation --no-deps)
  if [[ -n "$TARGET" ]]; then
    args+=(--target "$TARGET" --upgrade)
  fi
  for sdist in "$FILES"/*.tar.gz "$FILES"/*.zip; do
    log "building $(basename "$sdist") (MAX_JOBS=${MAX_JOBS:-16} NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90})"
    MAX_JOBS="${MAX_JOBS:-16}" NVTE_CUDA_ARCHS="${NVTE_CUDA_ARCHS:-90}" NVTE_FRAMEWORK=pytorch \
      "$PYTHON" -m pip install "${args[@]}" "${EXTRA_PIP_ARGS[@]}" "$sdist"
  done
}

import_check() {
  log "import check: ${IMPORT_CHECK[*]}"
  "$PYTHON" - "$TARGET" "${IMPORT_CHECK[@]}" <<'PY'
import importlib
import site
import sys

if sys.argv[1]:  # a --target dir: addsitedir also runs its .pth files, which PYTHONPATH does not
    site.addsitedir(sys.argv[1])
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    version = getattr(module, "__version__", "")
    print(f"[wheelhouse]   import {name} OK {version} ({module.__file__})")
PY
}

announce_overrides() {
  "$PYTHON" - "$HERE/manifest.json" <<'PY'
import json
import sys

overridden = json.load(open(sys.argv[1])).get("overridden", [])
if overridden:
    print(f"[wheelhouse] installing with --no-deps; {len(overridden)} requirement(s) overridden on purpose:")
for o in overridden:
    print(f"[wheelhouse]   {o['parent']} needs {o['requirement']}: installing {o['installed']}")
    print(f"[wheelhouse]     why: {o['reason']}")
PY
}

# pip check, each line marked as one of the overrides above or not (informational either way).
pip_check() {
  local report
  report="$("$PYTHON" -m pip check 2>&1)" && { log "pip check: no broken requirements"; return 0; }
  "$PYTHON" - "$HERE/manifest.json" "$report" <<'PY'
import json
import re
import sys


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


expected = {
    (canon(o["parent"].split("==")[0]), canon(re.split(r"[\s\[<>=!~;]", o["requirement"])[0]))
    for o in json.load(open(sys.argv[1])).get("overridden", [])
}
unexpected = 0
for line in sys.argv[2].splitlines():
    match = re.match(r"(\S+) \S+ has requirement ([A-Za-z0-9._-]+)", line)
    if match and (canon(match.group(1)), canon(match.group(2))) in expected:
        print(f"[wheelhouse] pip check (expected, overridden): {line}")
    else:
        unexpected += 1
        print(f"[wheelhouse] pip check (NOT an override of this wheelhouse): {line}")
print(f"[wheelhouse] pip check: {unexpected} problem(s) beyond the overrides (informational)")
PY
}

reassemble
verify
remove_parts
if (( VERIFY_ONLY )); then
  log "all files verified; nothing installed (--verify-only)"
  exit 0
fi
announce_overrides
install_wheels
if (( SKIP_BUILD )); then
  log "sdists not built (--skip-build)"
  exit 0
fi
build_sdists
if [[ -z "$TARGET" ]]; then
  pip_check
fi
import_check
log "done"
"""


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelhouseOptions:
    requirements: tuple[str, ...] = DEFAULT_REQUIREMENTS
    target: TargetEnv = TargetEnv()
    index: IndexOptions = IndexOptions()
    source_only: frozenset[str] = DEFAULT_SOURCE_ONLY
    keep_image: frozenset[str] = DEFAULT_KEEP_IMAGE
    exclude: frozenset[str] = frozenset()
    constraints: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()
    split_mb: float | None = None
    import_check: tuple[str, ...] = DEFAULT_IMPORT_CHECK


def read_freeze_file(path: Path | None) -> dict[str, str | None]:
    return parse_freeze(Path(path).read_text()) if path else {}


def build_wheelhouse(
    out_dir: Path, options: WheelhouseOptions = WheelhouseOptions(), freeze_file: Path | None = None
) -> Resolution:
    """Resolve, download, optionally split, and write manifest.json, SHA256SUMS and install.sh.

    Built in <out_dir>.partial and renamed at the end, so out_dir is always complete or absent.
    """
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    files_dir = staging / "files"
    files_dir.mkdir(parents=True)

    resolver = WheelhouseResolver(
        files_dir,
        read_freeze_file(freeze_file),
        options.target,
        options.index,
        source_only=options.source_only,
        keep_image=options.keep_image,
        exclude=options.exclude,
        constraints=options.constraints,
        overrides=options.overrides,
    )
    resolution = resolver.resolve(options.requirements)
    artifacts = sorted(resolution.artifacts.values(), key=lambda a: a.name)
    write_sha256sums(staging, artifacts)
    if options.split_mb:
        split_large_files(files_dir, artifacts, options.split_mb)
    write_manifest(staging, resolution, _settings_record(options, freeze_file))
    install = staging / "install.sh"
    no_deps = bool(resolution.excluded or resolution.overridden)
    install.write_text(render_install_script(options.import_check, no_deps=no_deps))
    install.chmod(0o755)

    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return resolution


def _settings_record(options: WheelhouseOptions, freeze_file: Path | None) -> dict:
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "requirements": list(options.requirements),
        "target": {
            "python_version": options.target.python_version,
            "abi": options.target.abi,
            "platforms": list(options.target.platforms),
        },
        "freeze_file": str(freeze_file) if freeze_file else None,
        "source_only": sorted(options.source_only),
        "keep_image": sorted(options.keep_image),
        "exclude": sorted(options.exclude),
        "constraints": list(options.constraints),
        "overrides": [asdict(o) for o in options.overrides],
        "split_mb": options.split_mb,
        "import_check": list(options.import_check),
    }


def summary_lines(out_dir: Path, resolution: Resolution) -> list[str]:
    artifacts = sorted(resolution.artifacts.values(), key=lambda a: a.name)
    lines = [
        f"{a.size / 2**20:9.1f} MiB  {a.file}" + (f"  ({len(a.parts)} parts)" if a.parts else "")
        for a in artifacts
    ]
    total = sum(a.size for a in artifacts)
    lines.append(f"{total / 2**20:9.1f} MiB  total, {len(artifacts)} files in {out_dir}")
    lines += [f"from the image: {name}=={version}" for name, version in sorted(resolution.from_image.items())]
    lines += [
        f"excluded: {name} (wanted by {', '.join(by)})" for name, by in sorted(resolution.excluded.items())
    ]
    lines += [
        f"OVERRIDE: {o['parent']} needs {o['requirement']}, installing {o['installed']} ({o['reason']})"
        for o in resolution.overridden
    ]
    lines += [f"WARNING: {w}" for w in resolution.warnings]
    lines += [f"CONFLICT: {c}" for c in resolution.conflicts]
    return lines
