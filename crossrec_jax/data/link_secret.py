"""The secret key of user linkage (HMAC-SHA256 of each person's ID).

Anyone who knows the key can re-identify every pseudonymous user key by hashing guessed IDs,
so real data is never linked with a public key. Where the secret comes from, first match:

1. ``data.link_secret`` (config / ``--config.data.link_secret``)
2. ``data.link_secret_file`` (a file holding the secret)
3. the environment: ``CROSSREC_LINK_SECRET``, then ``CROSSREC_LINK_SECRET_FILE``
4. synthetic data only: the public demo constant (nothing real to protect)
5. otherwise a random 256-bit secret generated once per data folder and stored with mode 0600
   in ``$CROSSREC_SECRETS_DIR`` (default ``~/.config/crossrec_jax/link_secrets``), outside the
   data set and every checkpoint; where it is stored is printed once.

The secret itself is never written to a data set, a config name, a checkpoint, a metrics file
or a log: those identify it by ``digest(secret)``, a salted SHA-256 prefix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import secrets
import stat
import sys

from crossrec_jax.data.records import DataError

DEMO_SECRET = "crossrec-default-secret"  # public: only for the synthetic demo data
ENV_SECRET = "CROSSREC_LINK_SECRET"
ENV_SECRET_FILE = "CROSSREC_LINK_SECRET_FILE"
ENV_SECRETS_DIR = "CROSSREC_SECRETS_DIR"
_announced: set[str] = set()


@dataclasses.dataclass(frozen=True)
class LinkSecret:
  value: str = dataclasses.field(repr=False)
  origin: str          # where it came from (never the value): shown in messages and metadata
  file: str = ""       # the secret file, when it came from one (so scoring can find it again)

  @property
  def digest(self) -> str:
    return digest(self.value)


def digest(secret: str) -> str:
  """Identifies a secret without revealing it (salted, so it is no plain SHA-256 of it)."""
  return hashlib.sha256(b"crossrec-link-secret-v1\0" + secret.encode()).hexdigest()[:16]


def secrets_dir() -> pathlib.Path:
  default = pathlib.Path("~/.config/crossrec_jax/link_secrets").expanduser()
  return pathlib.Path(os.environ.get(ENV_SECRETS_DIR) or default)


def read_secret_file(path, what: str) -> LinkSecret:
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise DataError(f"{what} {path}: no such file; create it with a long random secret "
                    "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > FILE; "
                    "chmod 600 FILE`)")
  value = path.read_text(encoding="utf-8").strip()
  if not value:
    raise DataError(f"{what} {path}: the file is empty; put the secret in it")
  if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
    print(f"crossrec_jax: warning: link secret file {path} is readable by other users; "
          f"run `chmod 600 {path}`", file=sys.stderr)
  return LinkSecret(value, f"file {path}", str(path.absolute()))


def resolve(source: str, path: str = "", *, configured: str = "", configured_file: str = ""
            ) -> LinkSecret:
  """The linkage secret for a data set (see the module docstring for the order)."""
  if configured:
    if configured == DEMO_SECRET and source != "synthetic":
      raise DataError(f"data.link_secret is the public demo constant, which would let anyone "
                      f"re-identify the users of {path or source}; remove it (a random secret is "
                      f"then generated and stored for this data) or set {ENV_SECRET}")
    return LinkSecret(configured, "data.link_secret")
  if configured_file:
    return read_secret_file(configured_file, "data.link_secret_file")
  if os.environ.get(ENV_SECRET):
    return LinkSecret(os.environ[ENV_SECRET], f"environment {ENV_SECRET}")
  if os.environ.get(ENV_SECRET_FILE):
    return read_secret_file(os.environ[ENV_SECRET_FILE], ENV_SECRET_FILE)
  if source == "synthetic":
    return LinkSecret(DEMO_SECRET, "synthetic demo (public)")
  return _generated_for(path or source)


def _generated_for(data_path: str) -> LinkSecret:
  key = hashlib.sha256(str(pathlib.Path(data_path).expanduser().absolute()).encode()).hexdigest()[:16]
  directory = secrets_dir()
  target = directory / f"{pathlib.Path(data_path).name or 'data'}-{key}.secret"
  if not target.exists():
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # O_EXCL: two processes preparing at once keep one secret, never two
      fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_hex(32) + "\n")
    except FileExistsError:
      pass
  secret = read_secret_file(target, "generated link secret")
  if str(target) not in _announced:
    _announced.add(str(target))
    print(f"crossrec_jax: users of {data_path} are linked with the secret in {target} (mode "
          f"0600, generated once for this data). Keep it: scoring or re-preparing this data "
          f"with the same user keys needs it; or set {ENV_SECRET} / data.link_secret_file.",
          file=sys.stderr)
  return dataclasses.replace(secret, origin=f"generated {target}")
