"""Code signing, without NATS: keys, the trust store, the manifest, what verification refuses and names."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh._signing import (
    DOMAIN,
    SIGNATURE_FILE,
    Package,
    SignatureDoc,
    TrustStore,
    canonical_manifest,
    check_package,
    generate_key,
    install_package,
    key_id,
    list_keys,
    load_private_key,
    pack,
    parse_public,
    plugin_entry,
    read_package,
    sign_package,
    unpack,
    verify,
)
from plugin_sdk import (
    ConfigError,
    InitializationError,
    PermissionDenied,
    PluginConfig,
    SignatureInvalid,
    load_config_file,
)
from plugin_sdk.host import load_config_text

PACKAGES = Path(__file__).resolve().parents[1] / "packages"


@pytest.fixture
def pkg_dir(tmp_path: Path) -> Path:
    """A fresh copy of the test package (never the one in the repository)."""
    return Path(shutil.copytree(PACKAGES / "signed_greeter", tmp_path / "greeter"))


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def trust(tmp_path: Path, key: Ed25519PrivateKey) -> TrustStore:
    store = TrustStore(tmp_path / "trusted")
    store.add(key.public_key(), "release")
    return store


def refused(pkg: Package, trust: TrustStore) -> str:
    with pytest.raises(SignatureInvalid) as info:
        verify(pkg, trust)
    return str(info.value)


def resign(pkg_dir: Path, key: Ed25519PrivateKey, files: dict[str, str]) -> None:
    """A hand-made signature document: a trusted key signs whatever manifest it is given."""
    ident = key_id(key.public_key())
    doc = SignatureDoc(ident, files, key.sign(canonical_manifest(ident, files)))
    (pkg_dir / SIGNATURE_FILE).write_text(doc.render(), encoding="utf-8")


# -- keys -----------------------------------------------------------------------------------------

def test_generated_keys_are_private_files_in_a_private_directory(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    info = generate_key(keys, "release")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "release.key").stat().st_mode) == 0o600
    assert (keys / "release.pub").read_text().split() == [info.public_key, "release"]
    private, loaded = load_private_key(keys, "release")
    assert loaded.key_id == info.key_id == key_id(private.public_key())
    assert len(info.key_id) == 16 and int(info.key_id, 16) >= 0
    assert [k.key_id for k in list_keys(keys)] == [info.key_id]
    with pytest.raises(ValueError, match="already exists"):
        generate_key(keys, "release")


def test_a_private_key_others_can_read_is_refused(tmp_path: Path) -> None:
    generate_key(tmp_path, "loose")
    os.chmod(tmp_path / "loose.key", 0o644)
    with pytest.raises(ValueError, match=r"accessible by group or others .*chmod 600"):
        load_private_key(tmp_path, "loose")


def test_public_keys_parse_and_private_ones_are_refused(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    info = generate_key(tmp_path, "k")
    public, label = parse_public((tmp_path / "k.pub").read_text())
    assert key_id(public) == info.key_id and label == "k"
    with pytest.raises(ValueError, match="that is a private key") as exc:
        parse_public((tmp_path / "k.key").read_text())
    assert "BEGIN" not in str(exc.value)
    with pytest.raises(ValueError, match="not a public key"):
        parse_public("ssh-ed25519 AAAA")


def test_the_trust_store_is_keyed_by_key_id(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    store = TrustStore(tmp_path / "t")
    info = store.add(key.public_key(), "ci  release")
    assert info.name == "ci release" and (tmp_path / "t" / f"{info.key_id}.pub").exists()
    assert store.add(key.public_key(), "again").name == "ci release"  # trusting twice changes nothing
    assert [k.key_id for k in store.list()] == [info.key_id]
    other = Ed25519PrivateKey.generate()
    os.rename(tmp_path / "t" / f"{info.key_id}.pub", tmp_path / "t" / f"{key_id(other.public_key())}.pub")
    with pytest.raises(SignatureInvalid, match=f"holds key {info.key_id}"):  # renamed by hand: not trusted as another
        store.get(key_id(other.public_key()))
    assert store.get("../../etc/passwd") is None


# -- signing and verifying --------------------------------------------------------------------------

def test_a_signed_package_verifies_naming_its_key(pkg_dir: Path, key: Ed25519PrivateKey, trust: TrustStore) -> None:
    sig, count = sign_package(pkg_dir, key)
    assert sig == pkg_dir / SIGNATURE_FILE and count == 4
    doc = json.loads(sig.read_text())
    assert doc["key_id"] == key_id(key.public_key()) and "plugin.toml" in doc["files"]
    verified = verify(read_package(pkg_dir), trust)
    assert (verified.key_id, verified.signer, verified.files) == (key_id(key.public_key()), "release", 4)


def test_unsigned_is_refused_and_only_let_through_when_not_required(pkg_dir: Path, trust: TrustStore) -> None:
    pkg = read_package(pkg_dir)
    assert f"is not signed (no {SIGNATURE_FILE})" in refused(pkg, trust)
    assert check_package(pkg, trust, required=False, who="agent 'a'") is None
    with pytest.raises(SignatureInvalid, match="agent 'a' requires signatures"):
        check_package(pkg, trust, required=True, who="agent 'a'")


def test_a_key_not_in_the_trust_store_is_named(pkg_dir: Path, tmp_path: Path, trust: TrustStore) -> None:
    stranger = Ed25519PrivateKey.generate()
    sign_package(pkg_dir, stranger)
    message = refused(read_package(pkg_dir), trust)
    assert f"signed by key {key_id(stranger.public_key())}, which is not in the trust store" in message
    # ... and a bad signature is refused even where signatures are not required
    with pytest.raises(SignatureInvalid):
        check_package(read_package(pkg_dir), trust, required=False, who="agent 'a'")


@pytest.mark.parametrize("tamper, named", [
    (lambda d: (d / "signed_greeter_pkg" / "words.py").write_text('GREETING = "pwned"\n'),
     "file 'signed_greeter_pkg/words.py' changed"),
    (lambda d: (d / "signed_greeter_pkg" / "extra.py").write_text("import os\n"),
     "file 'signed_greeter_pkg/extra.py' was added"),
    (lambda d: (d / "signed_greeter_pkg" / "words.py").unlink(), "file 'signed_greeter_pkg/words.py' was removed"),
    (lambda d: (d / "plugin.toml").write_text('entry = "os:system"\n'), "file 'plugin.toml' changed"),
])
def test_tampering_is_refused_naming_the_file(pkg_dir: Path, key: Ed25519PrivateKey, trust: TrustStore,
                                              tamper: object, named: str) -> None:
    sign_package(pkg_dir, key)
    verify(read_package(pkg_dir), trust)
    tamper(pkg_dir)  # type: ignore[operator]
    message = refused(read_package(pkg_dir), trust)
    assert named in message and f"signed by key {key_id(key.public_key())}" in message


def test_an_edited_manifest_does_not_verify(pkg_dir: Path, key: Ed25519PrivateKey, trust: TrustStore) -> None:
    sign_package(pkg_dir, key)
    words = pkg_dir / "signed_greeter_pkg" / "words.py"
    words.write_text('GREETING = "pwned"\n')
    doc = json.loads((pkg_dir / SIGNATURE_FILE).read_text())
    doc["files"]["signed_greeter_pkg/words.py"] = hashlib.sha256(words.read_bytes()).hexdigest()
    (pkg_dir / SIGNATURE_FILE).write_text(json.dumps(doc))
    assert "does not verify with key" in refused(read_package(pkg_dir), trust)


def test_the_key_id_and_the_domain_are_inside_what_is_signed(pkg_dir: Path, key: Ed25519PrivateKey,
                                                            trust: TrustStore) -> None:
    other = Ed25519PrivateKey.generate()
    trust.add(other.public_key(), "other")
    sign_package(pkg_dir, key)
    doc = json.loads((pkg_dir / SIGNATURE_FILE).read_text())
    doc["key_id"] = key_id(other.public_key())  # claim the other trusted key signed it
    (pkg_dir / SIGNATURE_FILE).write_text(json.dumps(doc))
    assert "does not verify with key" in refused(read_package(pkg_dir), trust)
    # A signature over the same manifest without the domain prefix is no package signature.
    hashes = read_package(pkg_dir).hashes()
    ident = key_id(key.public_key())
    manifest = canonical_manifest(ident, hashes)
    assert manifest.startswith(DOMAIN + f"key {ident}\n".encode())
    bare = key.sign(manifest[len(DOMAIN):])
    doc.update(key_id=ident, signature=base64.b64encode(bare).decode())
    (pkg_dir / SIGNATURE_FILE).write_text(json.dumps(doc))
    assert "does not verify with key" in refused(read_package(pkg_dir), trust)


def test_symlinks_are_refused_at_signing_and_at_verification(pkg_dir: Path, key: Ed25519PrivateKey,
                                                             trust: TrustStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.py"
    outside.write_text("SECRET = 1\n")
    link = pkg_dir / "signed_greeter_pkg" / "linked.py"
    link.symlink_to(outside)
    with pytest.raises(SignatureInvalid, match=r"'signed_greeter_pkg/linked\.py' is a symlink"):
        sign_package(pkg_dir, key)
    link.unlink()
    sign_package(pkg_dir, key)
    # A hand-made manifest that lists the symlink (with its target's hash) is refused all the same.
    files = read_package(pkg_dir).hashes()
    files["signed_greeter_pkg/linked.py"] = hashlib.sha256(outside.read_bytes()).hexdigest()
    resign(pkg_dir, key, files)
    link.symlink_to(outside)
    with pytest.raises(SignatureInvalid, match=r"'signed_greeter_pkg/linked\.py' is a symlink"):
        verify(read_package(pkg_dir), trust)
    # So is a symlinked directory.
    link.unlink()
    (pkg_dir / "more").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SignatureInvalid, match="'more' is a symlink"):
        read_package(pkg_dir)


@pytest.mark.parametrize("path, why", [
    ("../outside.py", "has a '..' component"),
    ("signed_greeter_pkg/../../outside.py", "has a '..' component"),
    ("/etc/passwd", "is absolute"),
    ("a//b.py", "is not a normalized relative path"),
])
def test_a_manifest_reaching_outside_the_package_is_refused(pkg_dir: Path, key: Ed25519PrivateKey,
                                                            trust: TrustStore, path: str, why: str) -> None:
    files = read_package(pkg_dir).hashes() | {path: "0" * 64}
    resign(pkg_dir, key, files)  # signed by a trusted key: the path itself is what is refused
    message = refused(read_package(pkg_dir), trust)
    assert f"path {path!r} {why}" in message


def test_pycache_and_pyc_are_ignored(pkg_dir: Path, key: Ed25519PrivateKey, trust: TrustStore) -> None:
    sign_package(pkg_dir, key)
    cache = pkg_dir / "signed_greeter_pkg" / "__pycache__"
    cache.mkdir()
    (cache / "plugin.cpython-311.pyc").write_bytes(b"\0" * 16)
    (pkg_dir / "stray.pyc").write_bytes(b"\0")
    pkg = read_package(pkg_dir)
    assert not [p for p in pkg.files if "pycache" in p or p.endswith(".pyc")]
    verify(pkg, trust)


# -- packing for the wire, wheels -----------------------------------------------------------------

def _zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # ("Duplicate name": the archive is meant to be bad)
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


def test_what_is_packed_unpacks_to_the_same_verified_files(pkg_dir: Path, key: Ed25519PrivateKey,
                                                           trust: TrustStore) -> None:
    sign_package(pkg_dir, key)
    pkg = read_package(pkg_dir)
    back = unpack(pack(pkg), kind="dir", signature=pkg.signature, source="greeter")
    assert dict(back.files) == dict(pkg.files)
    assert pack(back) == pack(pkg)  # deterministic
    verify(back, trust)


@pytest.mark.parametrize("entries, named", [
    ([("../evil.py", b"x", stat.S_IFREG | 0o644)], "path '../evil.py' has a '..' component"),
    ([("link.py", b"/etc/passwd", stat.S_IFLNK | 0o777)], "'link.py' is a symlink"),
    ([("fifo", b"", stat.S_IFIFO | 0o644)], "'fifo' is not a regular file"),
    ([("a.py", b"1", stat.S_IFREG | 0o644), ("a.py", b"2", stat.S_IFREG | 0o644)], "'a.py' appears twice"),
    ([("a", b"1", stat.S_IFREG | 0o644), ("a/b.py", b"2", stat.S_IFREG | 0o644)], "'a' is both a file and"),
])
def test_an_archive_off_the_wire_is_checked_entry_by_entry(entries: list[tuple[str, bytes, int]],
                                                           named: str) -> None:
    with pytest.raises(SignatureInvalid, match=re.escape(named)):
        unpack(_zip(entries), kind="dir", signature=None, source="sent")


def make_wheel(path: Path, *, module: str = "wheel_greeter", greeting: str = "hello from a wheel") -> Path:
    dist = f"{module}-1.0.0.dist-info"
    plugin = (
        "from plugin_sdk import Message, Plugin\n\n"
        "class Greeter(Plugin):\n"
        "    name = 'wheel-greeter'\n"
        "    version = '1.0.0'\n\n"
        "    async def handle_message(self, message: Message) -> object:\n"
        f"        return {{'greeting': {greeting!r}, 'file': __file__}}\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(f"{module}/plugin.py", plugin)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0.0\n")
        zf.writestr(f"{dist}/entry_points.txt", f"[groundhog.plugins]\nwheel-greeter = {module}.plugin:Greeter\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


def test_a_wheel_is_signed_in_a_sidecar_and_names_its_entry_point(tmp_path: Path, key: Ed25519PrivateKey,
                                                                  trust: TrustStore) -> None:
    wheel = make_wheel(tmp_path / "wheel_greeter-1.0.0-py3-none-any.whl")
    sig, count = sign_package(wheel, key)
    assert sig == tmp_path / "wheel_greeter-1.0.0-py3-none-any.whl.sig" and count == 5
    pkg = read_package(wheel)
    assert pkg.kind == "wheel" and verify(pkg, trust).files == 5
    assert plugin_entry(pkg) == ("wheel_greeter.plugin:Greeter", None)
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.writestr("wheel_greeter/extra.py", "")
    assert "file 'wheel_greeter/extra.py' was added" in refused(read_package(wheel), trust)


# -- the entry, the store copy -----------------------------------------------------------------------

def test_entry_is_read_here_and_the_rest_is_a_valid_config(pkg_dir: Path) -> None:
    with pytest.raises(ConfigError, match="entry: Extra inputs are not permitted"):  # why we take it out
        load_config_file(pkg_dir / "plugin.toml")
    ref, config = plugin_entry(read_package(pkg_dir))
    assert ref == "signed_greeter_pkg.plugin:Greeter"
    assert config is not None and "entry" not in config
    assert load_config_text(config, base=PluginConfig(name="x"), source="x").settings == {"punctuation": "!"}
    (pkg_dir / "plugin.toml").write_text('description = "no entry"\n')
    with pytest.raises(ConfigError, match="no entry"):
        plugin_entry(read_package(pkg_dir))
    (pkg_dir / "plugin.toml").write_text('entry = "not a ref"\n')
    with pytest.raises(ConfigError, match="entry must be"):
        plugin_entry(read_package(pkg_dir))


def test_the_store_copy_holds_exactly_the_verified_files(pkg_dir: Path, key: Ed25519PrivateKey,
                                                         tmp_path: Path) -> None:
    sign_package(pkg_dir, key)
    pkg = read_package(pkg_dir)
    ref, text = plugin_entry(pkg)
    config_path = tmp_path / "config.toml"
    config_path.write_text(text or "")
    config, copy = install_package(pkg, tmp_path / "store", ref, config_path)
    assert (config.name, config.version, config.settings) == ("signed-greeter", "1.0.0", {"punctuation": "!"})
    assert copy == tmp_path / "store" / f"signed-greeter-1.0.0-{pkg.digest()}"
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == sorted(pkg.files)
    assert not (copy / SIGNATURE_FILE).exists()
    assert (copy / "signed_greeter_pkg" / "words.py").read_bytes() == pkg.files["signed_greeter_pkg/words.py"]
    assert install_package(pkg, tmp_path / "store", ref, config_path)[1] == copy  # the same content: reused
    assert [p.name for p in (tmp_path / "store").iterdir()] == [copy.name]  # no staging left behind


def test_a_bad_entry_is_refused_typed_without_running_in_this_process(pkg_dir: Path, tmp_path: Path) -> None:
    (pkg_dir / "plugin.toml").write_text('entry = "signed_greeter_pkg.plugin:Nope"\n')
    pkg = read_package(pkg_dir)
    ref, _ = plugin_entry(pkg)
    with pytest.raises(InitializationError, match="has no attribute 'Nope'"):
        install_package(pkg, tmp_path / "store", ref, None)
    assert [p.name for p in (tmp_path / "store").iterdir()] == []
    assert "signed_greeter_pkg" not in sys.modules


def test_signature_invalid_is_a_permission_refusal() -> None:
    assert issubclass(SignatureInvalid, PermissionDenied) and SignatureInvalid.code == 403
