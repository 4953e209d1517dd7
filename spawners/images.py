"""Notebook images an operator allows, and the Apptainer command that runs a server in one.

Pure data and pure functions: no traitlets, no subprocess, no network. The operator writes an
allow-list (TOML, or a dict from any config); a user or a course picks an image by name; the
Slurm spawner turns the pick into an argv prefix and appends ``jupyterhub-singleuser``::

    allow = load_image_allow_list("/etc/sovereign-portal/images.toml")
    image = allow.choose("gpu", groups={"physics"})
    argv = apptainer_argv(image, cleanenv=allow.cleanenv, binds=allow.binds)
    # ['apptainer', 'exec', '--nv', '--cleanenv', '/sif/gpu-2026.11.sif']
    argv += ["jupyterhub-singleuser"]

A name that is not on the list, or not open to the user's groups, raises :class:`ImageError`
with a message that lists the names the user may choose (safe to show them). Locations are
checked when the list is loaded: an absolute ``.sif`` path or a ``docker://``, ``oras://`` or
``library://`` reference, never something Apptainer would read as an option.

With ``--cleanenv`` Apptainer drops the host environment except ``APPTAINERENV_*`` variables.
The process that runs the argv inside the job must forward what the server needs (the
``JUPYTERHUB_*`` variables, and the device variables Slurm sets at run time) under that prefix:
:func:`forward_env` builds that mapping; :data:`JOB_ENV` lists the job's device variables.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RequestRefused
from .request import ImageName

__all__ = [
    "JOB_ENV",
    "ImageAllowList",
    "ImageError",
    "NotebookImage",
    "apptainer_argv",
    "forward_env",
    "load_image_allow_list",
]

GroupName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")]

#: Variables Slurm (or the local spawner) sets for the job that the server needs to see.
JOB_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "SLURM_JOB_ID",
    "SLURM_JOB_GPUS",
    "SLURM_JOB_NODELIST",
    "SLURMD_NODENAME",
)

_SCHEMES = ("docker://", "oras://", "library://")
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}$")
_PATH = re.compile(r"^/[A-Za-z0-9._/+@-]{1,1023}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class ImageError(RequestRefused):
    """An image that cannot be used. ``str()`` is safe to show the user; ``reason`` is a label.

    A refused choice is HTTP 400; a broken allow-list (``reason="bad_config"``) is 500.
    """

    def __init__(self, message: str, reason: str = "image_not_allowed") -> None:
        status = 500 if reason == "bad_config" else 400
        field = None if reason == "bad_config" else "image"
        super().__init__(message, reason, status=status, field=field)


def _check_location(value: str) -> str:
    for scheme in _SCHEMES:
        if value.startswith(scheme):
            ref = value[len(scheme) :]
            if not _REF.match(ref):
                raise ValueError(
                    f"{scheme} reference {ref[:80]!r} has characters outside [A-Za-z0-9._/:@+-]"
                )
            return value
    if not _PATH.match(value):
        raise ValueError(
            "location must be an absolute path to a .sif file (characters A-Za-z0-9._/+@-) or "
            "a docker://, oras:// or library:// reference, e.g. /shared/images/base-2026.11.sif "
            "or docker://registry.example.org/sovereign-portal/base:2026.11"
        )
    path = PurePosixPath(value)
    if ".." in path.parts:
        raise ValueError(f"location {value!r} must not contain '..'")
    if path.suffix != ".sif":
        raise ValueError(f"location {value!r} is a path but not a .sif file")
    return value


def _check_bind(value: str) -> str:
    parts = value.split(":")
    if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ValueError(f"bind {value!r} must be SRC, SRC:DST or SRC:DST:ro|rw")
    for p in parts[:2]:
        if not _PATH.match(p) or ".." in PurePosixPath(p).parts:
            raise ValueError(f"bind {value!r}: {p!r} is not a clean absolute path")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NotebookImage(_Strict):
    """One image on the allow-list."""

    name: ImageName = Field(description="What users and courses choose, e.g. 'gpu'")
    location: str = Field(
        description="Absolute path to a .sif file, or a docker://, oras:// or library:// reference"
    )
    description: Annotated[str, Field(max_length=200)] = ""
    groups: list[GroupName] = Field(
        [], description="Groups allowed to choose this image; empty with no courses = everyone"
    )
    courses: list[GroupName] = Field(
        [], description="Course groups that use this image (and are allowed to choose it)"
    )
    gpu: bool = Field(True, description="Pass --nv so the host's NVIDIA driver is visible")

    @field_validator("location")
    @classmethod
    def _valid_location(cls, v: str) -> str:
        return _check_location(v)

    @property
    def open_to_all(self) -> bool:
        return not self.groups and not self.courses

    def allows(self, groups: Iterable[str]) -> bool:
        """Whether a user in ``groups`` may run this image."""
        return self.open_to_all or bool(set(groups) & (set(self.groups) | set(self.courses)))


class ImageAllowList(_Strict):
    """The images an operator allows, and how Apptainer runs them."""

    images: Annotated[list[NotebookImage], Field(min_length=1)]
    default: ImageName | None = Field(
        None, description="Image used when neither the user nor a course chose one"
    )
    apptainer: str = Field("apptainer", description="The apptainer executable (name or path)")
    cleanenv: bool = Field(True, description="Pass --cleanenv: the host environment stays out")
    binds: list[str] = Field([], description="Extra --bind entries: SRC[:DST[:ro|rw]]")

    @field_validator("binds")
    @classmethod
    def _valid_binds(cls, v: list[str]) -> list[str]:
        return [_check_bind(b) for b in v]

    @field_validator("apptainer")
    @classmethod
    def _check_apptainer(cls, v: str) -> str:
        if not (re.match(r"^[a-z][a-z0-9_-]{0,63}$", v) or _PATH.match(v)):
            raise ValueError(f"apptainer {v!r} must be a plain command name or an absolute path")
        return v

    @model_validator(mode="after")
    def _check_names(self) -> ImageAllowList:
        names = [i.name for i in self.images]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"image names must be unique; repeated: {', '.join(dupes)}")
        if self.default is not None and self.default not in names:
            raise ValueError(
                f"default image {self.default!r} is not in images ({', '.join(names)})"
            )
        return self

    def get(self, name: str) -> NotebookImage | None:
        return next((i for i in self.images if i.name == name), None)

    def available_to(self, groups: Iterable[str]) -> list[NotebookImage]:
        """The images a user in ``groups`` may choose, in the operator's order."""
        groups = set(groups)
        return [i for i in self.images if i.allows(groups)]

    def choose(
        self, name: str | None, groups: Iterable[str] = (), course: str | None = None
    ) -> NotebookImage:
        """The image to run: the user's choice, else the course's image, else the default.

        Raises :class:`ImageError` (message safe to show) when the name is not on the list or
        not open to the user's groups; the message lists the names the user may choose.
        """
        groups = set(groups)
        if name is None:
            if course is not None:
                for candidate in self.images:
                    if course in candidate.courses and candidate.allows(groups):
                        return candidate
            default = self.get(self.default) if self.default is not None else None
            if default is not None and default.allows(groups):
                return default
            raise ImageError(
                "No image was chosen and there is no default for you. " + self._choices(groups),
                reason="image_missing",
            )
        image = self.get(name)
        if image is None or not image.allows(groups):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ImageError(f"Image {shown!r} is not available to you. " + self._choices(groups))
        return image

    def argv(
        self,
        name: str | None,
        groups: Iterable[str] = (),
        course: str | None = None,
        env_file: str | None = None,
    ) -> list[str]:
        """``choose()`` then :func:`apptainer_argv` with this list's settings."""
        return apptainer_argv(
            self.choose(name, groups, course),
            apptainer=self.apptainer,
            cleanenv=self.cleanenv,
            binds=self.binds,
            env_file=env_file,
        )

    def _choices(self, groups: set[str]) -> str:
        names = [i.name for i in self.available_to(groups)]
        if not names:
            return "No image is open to your groups; ask your course's instructor or the operator."
        return f"Choose one of: {', '.join(names)}."


def apptainer_argv(
    image: NotebookImage,
    *,
    apptainer: str = "apptainer",
    cleanenv: bool = True,
    binds: Iterable[str] = (),
    env_file: str | None = None,
) -> list[str]:
    """The argv prefix that runs a command inside ``image``: append the command to it.

    ``env_file`` is an absolute path to a file of ``NAME=value`` lines read by Apptainer
    (``--env-file``): the way to hand the server secrets without argv or the job environment.
    """
    argv = [apptainer, "exec"]
    if image.gpu:
        argv.append("--nv")
    if cleanenv:
        argv.append("--cleanenv")
    for bind in binds:
        argv += ["--bind", _check_bind(bind)]
    if env_file is not None:
        if not _PATH.match(env_file) or ".." in PurePosixPath(env_file).parts:
            raise ImageError(f"env_file {env_file!r} must be a clean absolute path", "bad_config")
        argv += ["--env-file", env_file]
    argv.append(_check_location(image.location))
    return argv


def forward_env(environ: Mapping[str, str], names: Iterable[str] = JOB_ENV) -> dict[str, str]:
    """``APPTAINERENV_<NAME>`` for each of ``names`` set in ``environ``.

    Apptainer sets ``NAME`` inside a ``--cleanenv`` container from ``APPTAINERENV_NAME``.
    """
    out: dict[str, str] = {}
    for n in names:
        if not _ENV_NAME.match(n):
            raise ImageError(f"{n!r} is not an environment variable name", "bad_config")
        if n in environ:
            out[f"APPTAINERENV_{n}"] = environ[n]
    return out


def load_image_allow_list(source: str | Path | Mapping[str, Any]) -> ImageAllowList:
    """Read an allow-list from a TOML file (``[[images]]`` tables) or a mapping.

    Raises :class:`ImageError` naming the file, the key and the reason.
    """
    where = "image allow-list"
    if isinstance(source, Mapping):
        data: Mapping[str, Any] = source
    else:
        where = str(source)
        try:
            data = tomllib.loads(Path(source).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ImageError(f"{where}: {e}", "bad_config") from None
    try:
        return ImageAllowList.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()
        )
        raise ImageError(f"{where}: {problems}", "bad_config") from None
