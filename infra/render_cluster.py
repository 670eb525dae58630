"""Render ray_cluster.yaml for `ray up`: fill its ${VAR} placeholders from the environment, validate the result
against Ray's own autoscaler schema (ray/autoscaler/ray-schema.json) and print it.

    python infra/render_cluster.py > build/ray_cluster.rendered.yaml      # every variable set (see the YAML header)
    python infra/render_cluster.py --example                                # placeholder values: check the template only

Placeholders are `${NAME}` (upper case); a plain `$NAME` is left for the node's shell (e.g. `$RAY_HEAD_IP`).
Derived: CREMA_WHEEL_NAME (the file name of CREMA_WHEEL). Defaulted: CREMA_RAY_AUTH_TOKEN_FILE (~/.ray/auth_token).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "ray_cluster.yaml"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

# Shape-correct stand-ins for --example (and the tests): never real account data.
EXAMPLE = {
    "CREMA_AWS_REGION": "eu-west-1",
    "CREMA_AMI_ID": "ami-0123456789abcdef0",
    "CREMA_REGISTRY": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
    "CREMA_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/crema:0.1.0",
    "CREMA_HEAD_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/crema-ray-head",
    "CREMA_WORKER_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/crema-ray-worker",
    "CREMA_SUBNET_IDS": "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
    "CREMA_SECURITY_GROUP_ID": "sg-0123456789abcdef0",
    "CREMA_SSH_KEY_NAME": "crema-ray",
    "CREMA_SSH_PRIVATE_KEY": "~/.ssh/crema-ray.pem",
    "CREMA_WHEEL": "dist/crema-0.1.0-py3-none-any.whl",
    "CREMA_RAY_AUTH_TOKEN_FILE": "~/.ray/auth_token",
}

PATTERNS = {
    "CREMA_AMI_ID": r"ami-[0-9a-f]{8,17}",
    "CREMA_HEAD_PROFILE_ARN": r"arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+",
    "CREMA_WORKER_PROFILE_ARN": r"arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+",
    "CREMA_SUBNET_IDS": r"subnet-[0-9a-f]+(,subnet-[0-9a-f]+)*",
    "CREMA_SECURITY_GROUP_ID": r"sg-[0-9a-f]+",
    "CREMA_WHEEL": r".*/?crema-[^/]+\.whl",
}


class RenderError(ValueError):
    pass


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def values(env: dict[str, str], example: bool = False) -> dict[str, str]:
    vals = dict(EXAMPLE) if example else {k: v for k, v in env.items() if k.startswith("CREMA_") and v}
    vals.setdefault("CREMA_RAY_AUTH_TOKEN_FILE", "~/.ray/auth_token")
    if "CREMA_WHEEL" in vals:
        vals["CREMA_WHEEL_NAME"] = Path(vals["CREMA_WHEEL"]).name
    for name, pattern in PATTERNS.items():
        if name in vals and not re.fullmatch(pattern, vals[name]):
            raise RenderError(f"{name}={vals[name]!r} does not look like {pattern}")
    image = vals.get("CREMA_IMAGE", "")
    if image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest") or "/" not in image):
        raise RenderError(f"CREMA_IMAGE={image!r}: use the registry path with a version tag (not :latest)")
    if image and vals.get("CREMA_REGISTRY") and not image.startswith(vals["CREMA_REGISTRY"] + "/"):
        raise RenderError(f"CREMA_IMAGE={image!r} is not in CREMA_REGISTRY={vals['CREMA_REGISTRY']!r}")
    return vals


def render(text: str, vals: dict[str, str]) -> str:
    missing = sorted(placeholders(text) - set(vals))
    if missing:
        raise RenderError("unset: " + ", ".join(missing) + " (see the header of ray_cluster.yaml)")
    # CREMA_SUBNET_IDS (a,b) stands in a quoted YAML list item: "${CREMA_SUBNET_IDS}" becomes "a", "b".
    vals = {**vals, "CREMA_SUBNET_IDS": vals["CREMA_SUBNET_IDS"].replace(",", '", "')} \
        if "CREMA_SUBNET_IDS" in vals else vals
    return PLACEHOLDER.sub(lambda m: vals[m.group(1)], text)


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate(config: dict) -> dict:
    """Ray's autoscaler schema on the file as written (jsonschema.ValidationError), then what `ray up` does before
    launching anything: merge the provider's defaults (prepare_config) and check the result (validate_config:
    the schema again plus node-type consistency). Returns the prepared config; makes no cloud calls."""
    import copy

    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--example", action="store_true", help="fill placeholders with example values")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        vals = values(dict(os.environ), example=args.example)
        text = render(args.template.read_text(), vals)
        config = yaml.safe_load(text)
        validate(config)
        if not args.example:
            for local in config.get("file_mounts", {}).values():
                if not Path(local).expanduser().is_file():
                    raise RenderError(f"file_mounts source {local} does not exist")
    except Exception as exc:  # noqa: BLE001 - one clear line for the operator
        print(f"render_cluster: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
