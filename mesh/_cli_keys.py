"""``mesh keys generate|trust|list``, ``mesh sign`` and ``mesh verify``: code signing of plugin packages.

Keys are Ed25519 (``mesh/_signing.py``); a private key is never printed. See ``docs/security.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from plugin_sdk import PluginError

from ._cli_common import JsonOpt, _fail, _print_json, app, err, out

T = TypeVar("T")

KeysDirOpt = Annotated[Path | None, typer.Option(
    "--keys-dir", envvar="MESH_KEYS_DIR", show_default=False,
    help="Your signing keys (env MESH_KEYS_DIR; default ~/.config/groundhog/keys).")]
TrustDirOpt = Annotated[Path | None, typer.Option(
    "--trust-dir", envvar="MESH_TRUST_DIR", show_default=False,
    help="The trusted public keys (env MESH_TRUST_DIR; default ~/.config/groundhog/trusted).")]

keys_app = typer.Typer(help="Signing keys: yours, and the public keys you trust.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _one_line(fn: Callable[[], T]) -> T:
    """``fn()``, every expected failure one ``error: …`` line (exit 1), no traceback."""
    try:
        return fn()
    except PluginError as exc:
        raise _fail(escape(f"{type(exc).__name__}: {exc}")) from None
    except ValueError as exc:
        raise _fail(escape(str(exc))) from None
    except OSError as exc:
        raise _fail(escape(f"{exc.filename or ''}: {exc.strerror}".lstrip(": "))) from None


def _keys_dir(given: Path | None) -> Path:
    from ._signing import default_keys_dir

    return (given or default_keys_dir()).expanduser()


def _trust_dir(given: Path | None) -> Path:
    from ._signing import default_trust_dir

    return (given or default_trust_dir()).expanduser()


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Argument(help="Key name: <name>.key (private, 0600) and <name>.pub.")] = "default",
    keys_dir: KeysDirOpt = None,
) -> None:
    """Make a new Ed25519 signing key pair; prints its key id and public key (never the private key)."""
    from ._signing import generate_key

    directory = _keys_dir(keys_dir)
    info = _one_line(lambda: generate_key(directory, name))
    out.print(f"key {info.name}: id {info.key_id}, public key {info.public_key}", highlight=False, markup=False)
    err.print(f"private key {info.path} (mode 0600); trust the public key where packages are verified: "
              f"mesh keys trust {directory / (info.name + '.pub')}", highlight=False, markup=False)


@keys_app.command("trust")
def keys_trust(
    key: Annotated[str, typer.Argument(help="A public key (ed25519:<base64>, as in a .pub file) or a file "
                                       "holding one (.pub, or a PEM public key).")],
    name: Annotated[str | None, typer.Option("--name", help="A label for it (default: the .pub file's).")] = None,
    trust_dir: TrustDirOpt = None,
) -> None:
    """Trust a public key: packages it signed are accepted by `mesh verify` and by agents using this store."""
    from ._signing import TrustStore, parse_public

    def trust() -> str:
        path = Path(key).expanduser()
        text = path.read_text(encoding="utf-8") if not key.startswith("ed25519:") and path.is_file() else key
        public, label = parse_public(text)
        info = TrustStore(_trust_dir(trust_dir)).add(public, name if name is not None else label)
        return f"trusted key {info.key_id}{f' ({info.name})' if info.name else ''} in {info.path.parent}"

    out.print(_one_line(trust), highlight=False, markup=False)


@keys_app.command("list")
def keys_list(keys_dir: KeysDirOpt = None, trust_dir: TrustDirOpt = None, as_json: JsonOpt = False) -> None:
    """Your keys and the trusted keys, with their key ids."""
    from ._signing import TrustStore, list_keys

    mine_dir, trusted_dir = _keys_dir(keys_dir), _trust_dir(trust_dir)
    mine = _one_line(lambda: list_keys(mine_dir))
    trusted = _one_line(lambda: TrustStore(trusted_dir).list())
    if as_json:
        _print_json({"keys_dir": str(mine_dir), "trust_dir": str(trusted_dir),
                     "keys": [k.as_json() for k in mine], "trusted": [k.as_json() for k in trusted]})
        return
    table = Table("kind", "name", "key id", "public key")
    for k in mine:
        table.add_row("yours", escape(k.name), k.key_id, k.public_key)
    for k in trusted:
        table.add_row("trusted", escape(k.name), k.key_id, k.public_key)
    if not mine and not trusted:
        err.print(f"no keys in {mine_dir}, none trusted in {trusted_dir} (mesh keys generate)", highlight=False,
                  markup=False)
        return
    out.print(table)


@app.command()
def sign(
    path: Annotated[Path, typer.Argument(help="A plugin package: a directory holding plugin.toml, or a .whl.")],
    key: Annotated[str, typer.Option("--key", help="Which of your keys (mesh keys list).")] = "default",
    keys_dir: KeysDirOpt = None,
) -> None:
    """Sign a plugin package: writes PATH/mesh-signature.json (for a wheel, PATH.sig beside it)."""
    from ._signing import load_private_key, sign_package

    def run() -> str:
        private, info = load_private_key(_keys_dir(keys_dir), key)
        try:
            target, count = sign_package(path, private)
        except PluginError as exc:
            raise ValueError(f"cannot sign {path}: {exc}") from None
        return f"signed {path}: {count} files, key {info.name} ({info.key_id}); signature in {target}"

    out.print(_one_line(run), highlight=False, markup=False)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A plugin package: a directory holding plugin.toml, or a .whl.")],
    trust_dir: TrustDirOpt = None,
) -> None:
    """Check a package's signature against the trust store: exit 0 naming the signer's key, else 1 saying why."""
    from ._signing import TrustStore, read_package
    from ._signing import verify as check

    def run() -> str:
        verified = check(read_package(path), TrustStore(_trust_dir(trust_dir)))
        signer = f" ({verified.signer})" if verified.signer else ""
        return f"ok: {path}: {verified.files} files signed by key {verified.key_id}{signer}"

    out.print(_one_line(run), highlight=False, markup=False)
