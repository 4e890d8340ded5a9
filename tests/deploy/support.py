"""Reading deploy/ and the Dockerfile for tests/deploy: YAML documents, the Dockerfile's
instructions, env files, Kubernetes quantities, and the service's own option parser."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from curlfetch.options import TOKENS_ENV, Config, Options, env_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

VALID_TOKEN = "ci:" + "t" * 32
"""Stands in for a placeholder token when a configuration's other values are checked."""
VALID_DATABASE_URL = "postgresql://curlfetch:secret@postgres:5432/curlfetch"


# -- YAML --------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file; each must be a mapping."""
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict):
            raise TypeError(f"{path}: a document is {type(doc).__name__}, not a mapping")
    return documents


@attrs.frozen
class Manifest:
    path: Path
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.doc.get("metadata", {}).get("name", ""))

    def __str__(self) -> str:
        return f"{self.path.name}:{self.kind}/{self.name}"


def k8s_manifests() -> list[Manifest]:
    """The Kubernetes objects under deploy/k8s, kustomization.yaml aside."""
    return [
        Manifest(path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml_documents(path)
    ]


def one(kind: str) -> dict[str, Any]:
    """The single object of ``kind`` under deploy/k8s."""
    found = [m.doc for m in k8s_manifests() if m.kind == kind]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} in deploy/k8s, found {len(found)}")
    return found[0]


# -- the Dockerfile ----------------------------------------------------------------------


@attrs.frozen
class Instruction:
    keyword: str
    args: str
    stage: int
    """0 for the first FROM's stage, and so on."""


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions, with line continuations joined and comments dropped (a parser
    directive such as ``# syntax=`` is a comment too)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    if pending:
        raise ValueError(f"{path}: a continued line runs off the end")
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV`` of a stage as a mapping (``key=value`` pairs, shell-quoted)."""
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for item in shlex.split(instruction.args):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"ENV {instruction.args!r}: use key=value")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """A JSON (exec form) argument list: ``["twistd", "--nodaemon"]``."""
    value = json.loads(args)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"not an exec-form list: {args!r}")
    return value


# -- env files, quantities, durations -------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (Docker's env-file format: no quoting, ``#`` comments)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not KEY=value")
        env[key.strip()] = value
    return env


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?\Z")
_FACTORS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: object) -> float:
    """A Kubernetes quantity (``250m``, ``2``, ``512Mi``) as a number."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match[1]) * _FACTORS[match[2]]


# -- the service's own options ------------------------------------------------------------


def option_variables() -> set[str]:
    """Every environment variable the service reads: CURLFETCH_<OPTION> for each option of
    ``twistd curlfetch`` (value options, flags and the repeatable egress options), and
    CURLFETCH_TOKENS."""
    names = [str(row[0]) for row in Options.optParameters]
    names += [str(row[0]) for row in Options.optFlags]
    names += [
        attr[len("opt_") :].replace("_", "-")
        for attr in dir(Options)
        if attr.startswith("opt_") and attr not in ("opt_help", "opt_version")
    ]
    return {env_name(name) for name in names} | {TOKENS_ENV}


def parse_config(environ: Mapping[str, str]) -> Config:
    """The configuration the service would run with in ``environ`` (no command line):
    raises ``usage.UsageError`` exactly where ``twistd curlfetch`` would refuse to start."""
    options = Options(environ=dict(environ))
    options.parseOptions([])
    return options.config


def listen_port(listen: str) -> int:
    """The TCP port of a ``tcp:``/``tcp6:`` strports description."""
    from deploy.container.healthcheck import split_description

    kind, positional, keywords = split_description(listen)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"not a TCP listen description: {listen!r}")
    return int(keywords.get("port") or positional[0])
