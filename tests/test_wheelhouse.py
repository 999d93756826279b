"""The offline wheelhouse builder, on tiny fake wheels and sdists served from a local folder (no network).

pip runs for real (`pip download --no-index --find-links`), with the user's pip configuration
switched off so the test sees only the fake packages.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from megatron_sdzero import wheelhouse as wh

TARGET = wh.TargetEnv(python_version="3.12")


# ---------------------------------------------------------------------------------------------
# Fake distributions
# ---------------------------------------------------------------------------------------------


def _metadata(name: str, version: str, requires: list[str], extras: list[str] | None = None) -> str:
    lines = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}"]
    lines += [f"Provides-Extra: {extra}" for extra in extras or []]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return "\n".join(lines) + "\n\n"


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    requires: list[str] = (),
    *,
    extras: list[str] | None = None,
    tag: str = "py3-none-any",
    padding: int = 0,
) -> Path:
    """A minimal valid wheel with one module (name with '-' -> '_') exposing __version__."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{module}/blob.bin": os.urandom(padding),
        f"{dist_info}/METADATA": _metadata(name, version, list(requires), extras).encode(),
        f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode(),
    }
    record = [_record_line(path, data) for path, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{module}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def make_sdist(folder: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A setuptools sdist whose PKG-INFO carries Requires-Dist, buildable offline without isolation."""
    module = name.replace("-", "_")
    root = f"{module}-{version}"
    files = {
        "PKG-INFO": _metadata(name, version, list(requires)),
        "setup.py": f"import setuptools\nsetuptools.setup(name={name!r}, version={version!r}, "
        f"packages=[{module!r}])\n",
        f"{module}/__init__.py": f"__version__ = {version!r}\nBUILT_ON_NODE = True\n",
    }
    path = folder / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def isolated_pip():
    """pip sees no config files, no PIP_* settings and no constraints from this machine."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("PIP_")]:
            patch.delenv(key)
        patch.setenv("PIP_CONFIG_FILE", os.devnull)
        wh.pip_setting.cache_clear()
        yield
    wh.pip_setting.cache_clear()


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory) -> Path:
    """alpha -> beta>=2, gamma (win32 only), delta[fast], sdzfake-oldpkg>=2; delta[fast] -> epsilon;
    zeta is sdist-only and needs beta; native has per-platform wheels."""
    index = tmp_path_factory.mktemp("index")
    make_wheel(
        index,
        "sdzfake-alpha",
        "1.0",
        [
            "sdzfake-beta>=2",
            'sdzfake-gamma; sys_platform == "win32"',
            "sdzfake-delta[fast]",
            "sdzfake-oldpkg>=2",
            "sdzfake-numpy>=2",
        ],
    )
    make_wheel(index, "sdzfake-beta", "2.0")
    make_wheel(index, "sdzfake-beta", "3.0")
    make_wheel(index, "sdzfake-gamma", "1.0")
    make_wheel(index, "sdzfake-needs-beta3", "1.0", ["sdzfake-beta>=3"])
    make_wheel(index, "sdzfake-delta", "1.0", ['sdzfake-epsilon; extra == "fast"'], extras=["fast"])
    make_wheel(index, "sdzfake-epsilon", "1.0", padding=40_000)
    make_wheel(index, "sdzfake-oldpkg", "2.0")
    make_sdist(index, "sdzfake-zeta", "0.5", ["sdzfake-beta"])
    make_wheel(index, "sdzfake-native", "1.0", tag="cp312-cp312-manylinux_2_28_x86_64")
    make_wheel(index, "sdzfake-native", "1.1", tag="cp312-cp312-linux_x86_64")
    make_wheel(index, "sdzfake-native", "1.2", tag="cp311-cp311-manylinux_2_28_x86_64")
    make_wheel(index, "sdzfake-native", "1.3", tag="cp312-cp312-manylinux_2_39_x86_64")
    return index


def _resolver(tmp_path: Path, index: Path, image: dict[str, str | None], **kwargs) -> wh.WheelhouseResolver:
    files = tmp_path / "files"
    files.mkdir(parents=True, exist_ok=True)
    options = wh.IndexOptions(find_links=(index,), no_index=True, quiet=True)
    return wh.WheelhouseResolver(files, image, TARGET, options, source_only={"sdzfake-zeta"}, **kwargs)


# ---------------------------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------------------------


def test_parse_freeze_normalises_names_and_reads_url_installs():
    text = "\n".join(
        [
            "# comment",
            "Jinja2==3.1.6",
            "torch==2.11.0+cu130",
            "typing_extensions==4.16.0",
            "mylib @ file:///build/mylib-0.1-py3-none-any.whl",
            "-e git+https://example.com/repo.git#egg=editable",
            "",
        ]
    )
    assert wh.parse_freeze(text) == {
        "jinja2": "3.1.6",
        "torch": "2.11.0+cu130",
        "typing-extensions": "4.16.0",
        "mylib": None,
    }


def test_active_requirements_follow_markers_and_extras():
    requires = [
        "numpy",
        'pywin32; sys_platform == "win32"',
        'tomli; python_version < "3.11"',
        'onnx; extra == "export"',
        'rich; extra == "cli" and python_version >= "3.10"',
    ]
    env = TARGET.marker_environment()
    names = lambda reqs: [r.name for r in reqs]
    assert names(wh.active_requirements(requires, [], env)) == ["numpy"]
    assert names(wh.active_requirements(requires, ["export", "cli"], env)) == ["numpy", "onnx", "rich"]
    assert names(wh.active_requirements(requires, ["cli"], env, base=False)) == ["rich"]


def test_target_platform_tags_cover_manylinux_up_to_the_glibc_limit():
    tags = wh.manylinux_platforms("x86_64", (2, 35))
    assert tags[0] == "manylinux_2_35_x86_64"
    for tag in (
        "manylinux_2_34_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux2014_x86_64",
    ):
        assert tag in tags
    assert tags.index("manylinux_2_17_x86_64") + 1 == tags.index("manylinux2014_x86_64")
    assert "manylinux_2_36_x86_64" not in tags and "linux_x86_64" not in tags
    args = TARGET.pip_args()
    assert args[:4] == ["--python-version", "3.12", "--implementation", "cp"]
    assert "cp312" in args and "abi3" in args


def test_split_and_reassemble_round_trip(tmp_path):
    data = os.urandom(2_500_000)
    original = tmp_path / "big.whl"
    original.write_bytes(data)
    parts = wh.split_file(original, part_bytes=1_000_000)
    assert [p.name for p in parts] == ["big.whl.part000", "big.whl.part001", "big.whl.part002"]
    assert [p.stat().st_size for p in parts] == [1_000_000, 1_000_000, 500_000] and not original.exists()
    assert wh.reassemble_parts(tmp_path) == [original]
    assert original.read_bytes() == data


def test_install_script_renders_checks_and_rejects_bad_module_names(tmp_path):
    script = tmp_path / "install.sh"
    script.write_text(wh.render_install_script(["transformer_engine.pytorch", "megatron.core"], no_deps=True))
    assert "IMPORT_CHECK=(transformer_engine.pytorch megatron.core)" in script.read_text()
    assert "\nNO_DEPS=1\n" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    with pytest.raises(ValueError, match="not a module name"):
        wh.render_install_script(["os; rm -rf /"])


# ---------------------------------------------------------------------------------------------
# Resolution through pip, offline
# ---------------------------------------------------------------------------------------------


def test_resolver_skips_image_packages_follows_extras_and_fetches_sdists(tmp_path, fake_index):
    image = {"sdzfake-numpy": "2.5.2", "sdzfake-oldpkg": "1.0"}
    resolver = _resolver(tmp_path, fake_index, image)
    result = resolver.resolve(["sdzfake-alpha==1.0", "sdzfake-zeta", "sdzfake-native"])

    versions = {name: a.version for name, a in result.artifacts.items()}
    assert versions == {
        "sdzfake-alpha": "1.0",
        "sdzfake-beta": "3.0",
        "sdzfake-delta": "1.0",
        "sdzfake-epsilon": "1.0",  # from delta's "fast" extra
        "sdzfake-oldpkg": "2.0",  # the image's 1.0 is too old
        "sdzfake-zeta": "0.5",
        "sdzfake-native": "1.0",  # not linux_x86_64, not cp311, not glibc 2.39
    }
    assert result.from_image == {"sdzfake-numpy": "2.5.2"}
    assert result.artifacts["sdzfake-oldpkg"].replaces_image_version == "1.0"
    assert result.artifacts["sdzfake-zeta"].kind == "sdist"
    assert result.artifacts["sdzfake-beta"].required_by == ["sdzfake-alpha==1.0", "sdzfake-zeta==0.5"]
    assert not result.conflicts
    for artifact in result.artifacts.values():
        path = tmp_path / "files" / artifact.file
        assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert artifact.size == path.stat().st_size


def test_resolver_intersects_specifiers_of_one_level_and_reports_later_conflicts(tmp_path, fake_index):
    same_level = _resolver(tmp_path / "a", fake_index, {}).resolve(["sdzfake-beta>=2", "sdzfake-beta<3"])
    assert same_level.artifacts["sdzfake-beta"].version == "2.0" and not same_level.conflicts

    constrained = _resolver(
        tmp_path / "c", fake_index, {"sdzfake-numpy": "2.5.2"}, constraints=["sdzfake-beta<3"]
    )
    assert constrained.resolve(["sdzfake-alpha"]).artifacts["sdzfake-beta"].version == "2.0"

    later = _resolver(tmp_path / "b", fake_index, {}).resolve(["sdzfake-beta<3", "sdzfake-needs-beta3"])
    assert later.artifacts["sdzfake-beta"].version == "2.0"
    assert later.conflicts == [
        "sdzfake-needs-beta3==1.0 needs sdzfake-beta>=3, wheelhouse has sdzfake-beta 2.0"
    ]

    image = {"sdzfake-oldpkg": "1.0", "sdzfake-numpy": "2.5.2"}
    clash = _resolver(tmp_path / "d", fake_index, image, keep_image={"sdzfake-oldpkg"})
    result = clash.resolve(["sdzfake-alpha"])
    assert "sdzfake-oldpkg" not in result.artifacts and result.from_image["sdzfake-oldpkg"] == "1.0"
    assert result.conflicts == ["sdzfake-alpha==1.0 needs sdzfake-oldpkg>=2, image has sdzfake-oldpkg 1.0"]


def test_resolver_exclude_drops_a_subtree(tmp_path, fake_index):
    resolver = _resolver(tmp_path, fake_index, {"sdzfake-numpy": "2.5.2"}, exclude={"sdzfake-delta"})
    result = resolver.resolve(["sdzfake-alpha"])
    assert "sdzfake-delta" not in result.artifacts and "sdzfake-epsilon" not in result.artifacts
    assert result.excluded == {"sdzfake-delta": ["sdzfake-alpha==1.0"]}


# ---------------------------------------------------------------------------------------------
# The whole thing: build, split, ship, install offline with install.sh
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, fake_index) -> Path:
    root = tmp_path_factory.mktemp("built")
    freeze = root / "freeze.txt"
    freeze.write_text("sdzfake-numpy==2.5.2\nsdzfake-oldpkg==1.0\n")
    options = wh.WheelhouseOptions(
        requirements=("sdzfake-alpha==1.0", "sdzfake-zeta"),
        index=wh.IndexOptions(find_links=(fake_index,), no_index=True, quiet=True),
        source_only=frozenset({"sdzfake-zeta"}),
        split_mb=0.015,  # epsilon (~40 kB) is split into 3 parts
        import_check=("sdzfake_alpha", "sdzfake_epsilon", "sdzfake_zeta"),
    )
    out = root / "wheelhouse"
    wh.build_wheelhouse(out, options, freeze)
    return out


@pytest.fixture
def built(built_once, tmp_path) -> Path:
    """A private copy: the install tests consume the parts."""
    return Path(shutil.copytree(built_once, tmp_path / "wheelhouse"))


def test_built_wheelhouse_has_manifest_checksums_parts_and_installer(built_once):
    built = built_once
    manifest = json.loads((built / "manifest.json").read_text())
    entries = {f["name"]: f for f in manifest["files"]}
    assert set(entries) == {f"sdzfake-{n}" for n in ("alpha", "beta", "delta", "epsilon", "oldpkg", "zeta")}
    assert manifest["from_image"] == {"sdzfake-numpy": "2.5.2"}
    epsilon = entries["sdzfake-epsilon"]
    assert len(epsilon["parts"]) == 3 and not (built / "files" / epsilon["file"]).exists()
    assert sum(p["size"] for p in epsilon["parts"]) == epsilon["size"]
    for part in epsilon["parts"]:
        assert hashlib.sha256((built / "files" / part["file"]).read_bytes()).hexdigest() == part["sha256"]
    sums = dict(line.split("  ")[::-1] for line in (built / "SHA256SUMS").read_text().splitlines())
    assert sums == {f"files/{e['file']}": e["sha256"] for e in entries.values()}
    assert os.access(built / "install.sh", os.X_OK)
    assert not built.with_name("wheelhouse.partial").exists()


def _run_install(wheelhouse: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(wheelhouse / "install.sh"), *args], capture_output=True, text=True, env=env
    )


def test_install_script_reassembles_verifies_installs_and_builds_offline(built, tmp_path):
    target = tmp_path / "site"
    result = _run_install(built, "--target", str(target))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import sdzfake_zeta OK 0.5" in result.stdout
    assert (target / "sdzfake_epsilon" / "blob.bin").stat().st_size == 40_000
    assert (target / "sdzfake_zeta" / "__init__.py").read_text().endswith("BUILT_ON_NODE = True\n")
    assert not list((built / "files").glob("*.part*"))


def test_install_script_refuses_a_corrupted_part(built, tmp_path):
    part = next((built / "files").glob("*.part001"))
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    result = _run_install(built, "--verify-only")
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The GPU stack: TE and vLLM in one environment, their disagreement overridden on purpose
# ---------------------------------------------------------------------------------------------

# The shape of TE 2.20.2 / vLLM 0.26.0: te needs cudnn>=1.29, every such cudnn needs cutlass>=4.8 and
# tvm>=0.1.11, vllm pins cutlass==4.6.0 and tvm==0.1.10.
STACK_OVERRIDES = (
    wh.Override("sdzfake-cudnn==1.32.0", "te needs >=1.29"),
    wh.Override("sdzfake-cutlass==4.6.0", "vllm pins it"),
    wh.Override("sdzfake-tvm==0.1.10", "vllm pins it"),
)


@pytest.fixture(scope="module")
def stack_index(tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("stack-index")
    make_wheel(index, "sdzfake-te", "2.20.2", ["sdzfake-cudnn>=1.29"])
    make_wheel(index, "sdzfake-vllm", "0.26.0", ["sdzfake-cutlass[cu13]==4.6.0", "sdzfake-tvm==0.1.10"])
    make_wheel(index, "sdzfake-cudnn", "1.28.0")
    for version in ("1.32.0", "1.33.0"):
        make_wheel(index, "sdzfake-cudnn", version, ["sdzfake-cutlass[cu13]>=4.8.0", "sdzfake-tvm>=0.1.11"])
    for version in ("4.6.0", "4.8.0"):
        requires = [f'sdzfake-cutlass-cu13=={version}; extra == "cu13"']
        make_wheel(index, "sdzfake-cutlass", version, requires, extras=["cu13"])
        make_wheel(index, "sdzfake-cutlass-cu13", version)
    for version in ("0.1.10", "0.1.11"):
        make_wheel(index, "sdzfake-tvm", version)
    return index


STACK_REQUIREMENTS = ("sdzfake-te==2.20.2", "sdzfake-vllm==0.26.0")


def test_stack_conflicts_by_metadata_and_overrides_resolve_it_explicitly(tmp_path, stack_index):
    plain = _resolver(tmp_path / "plain", stack_index, {}).resolve(STACK_REQUIREMENTS)
    assert len(plain.conflicts) == 2 and not plain.overridden  # what --with-vllm gave before

    result = _resolver(tmp_path / "o", stack_index, {}, overrides=STACK_OVERRIDES).resolve(STACK_REQUIREMENTS)
    versions = {name: a.version for name, a in result.artifacts.items()}
    assert versions == {
        "sdzfake-te": "2.20.2",
        "sdzfake-vllm": "0.26.0",
        "sdzfake-cudnn": "1.32.0",  # not the newest 1.33.0, not vllm-compatible 1.28.0
        "sdzfake-cutlass": "4.6.0",
        "sdzfake-cutlass-cu13": "4.6.0",  # the extra of the overridden package is still followed
        "sdzfake-tvm": "0.1.10",
    }
    assert not result.conflicts
    assert result.overridden == [
        {
            "parent": "sdzfake-cudnn==1.32.0",
            "requirement": "sdzfake-cutlass[cu13]>=4.8.0",
            "installed": "sdzfake-cutlass==4.6.0",
            "reason": "vllm pins it",
        },
        {
            "parent": "sdzfake-cudnn==1.32.0",
            "requirement": "sdzfake-tvm>=0.1.11",
            "installed": "sdzfake-tvm==0.1.10",
            "reason": "vllm pins it",
        },
    ]


def test_stack_installs_in_one_environment_and_announces_what_it_overrides(tmp_path, stack_index):
    """The real pip into a fresh venv: --no-deps install, the overrides printed before installing, and
    pip check's two complaints recognised as exactly those overrides."""
    options = wh.WheelhouseOptions(
        requirements=STACK_REQUIREMENTS,
        index=wh.IndexOptions(find_links=(stack_index,), no_index=True, quiet=True),
        overrides=STACK_OVERRIDES,
        import_check=("sdzfake_te", "sdzfake_vllm", "sdzfake_cudnn"),
    )
    out = tmp_path / "wheelhouse"
    wh.build_wheelhouse(out, options)
    assert "\nNO_DEPS=1\n" in (out / "install.sh").read_text()
    assert len(json.loads((out / "manifest.json").read_text())["overridden"]) == 2

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python)}
    result = subprocess.run(["bash", str(out / "install.sh")], capture_output=True, text=True, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "2 requirement(s) overridden on purpose" in log
    assert "sdzfake-cudnn==1.32.0 needs sdzfake-tvm>=0.1.11: installing sdzfake-tvm==0.1.10" in log
    assert log.index("overridden on purpose") < log.index("installing 6 wheels")
    expected = [line for line in log.splitlines() if "pip check (expected, overridden)" in line]
    assert len(expected) == 2 and any("sdzfake-cutlass" in line for line in expected), log
    assert "pip check: 0 problem(s) beyond the overrides" in log
    assert "import sdzfake_vllm OK 0.26.0" in log
    freeze = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    assert {"sdzfake-cudnn==1.32.0", "sdzfake-cutlass==4.6.0", "sdzfake-tvm==0.1.10"} <= set(
        freeze.splitlines()
    )


def test_stack_gpu_flag_is_the_whole_stack_with_the_te_vllm_overrides():
    tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "build_wheelhouse.py"), run_name="tool")
    options = tool["options_from_args"](
        tool["parse_args"](["--out", "x", "--stack", "gpu", "--split-mb", "60"])
    )
    names = {wh.canonicalize_name(wh.Requirement(r).name) for r in options.requirements}
    assert {"megatron-core", "transformer-engine", "vllm", "gguf", "datasets", "math-verify"} <= names
    assert options.overrides == wh.VLLM_TE_OVERRIDES and options.split_mb == 60
    assert {o.name for o in options.overrides} == {
        "nvidia-cudnn-frontend",
        "nvidia-cutlass-dsl",
        "apache-tvm-ffi",
    }
    assert set(wh.VLLM_CONSTRAINTS) <= set(options.constraints)
    for module in ("transformer_engine.pytorch", "megatron.core", "vllm", "gguf", "math_verify", "datasets"):
        assert module in options.import_check
    with_trl = tool["options_from_args"](
        tool["parse_args"](["--out", "x", "--stack", "gpu", "--project-extra", "trl"])
    )
    assert "trl==1.16.0" in with_trl.requirements and "trl" not in with_trl.import_check
    te_only = tool["options_from_args"](tool["parse_args"](["--out", "x", "--with-project-deps"]))
    assert not te_only.overrides and "vllm" not in te_only.import_check
    vllm_alone = tool["options_from_args"](tool["parse_args"](["--out", "x", "-r", "vllm", "--with-vllm"]))
    assert not vllm_alone.overrides  # no TE: nothing to override
    with pytest.raises(SystemExit, match="no such extra"):
        tool["options_from_args"](tool["parse_args"](["--out", "x", "--project-extra", "nope"]))
