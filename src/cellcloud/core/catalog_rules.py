"""The function catalog's rules: Lambda's constraints on configuration fields, tags, layers,
concurrency settings, list paging and revision checks, with Lambda's own messages.

Pure: every bound comes from ``core/limits.py``, the runtimes a host offers and the time are
passed in (``frontend/functions.py`` is the catalog that applies these to its store).
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Sequence
from typing import Any

from . import errors
from .aliases import VERSION
from .errors import LambdaError
from .limits import DEFAULT_LIMITS, Limits

LAYER_VERSION_ARN = re.compile(
    r"^arn:aws[a-zA-Z-]*:lambda:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):layer:"
    r"(?P<name>[a-zA-Z0-9-_]{1,140}):(?P<version>[0-9]{1,12})$"
)
ARCHITECTURES = ("x86_64", "arm64")  # what a layer may declare (functions: x86_64 only)


def validation_error(message: str) -> LambdaError:
    """Lambda's model-level refusal (400 ``ValidationException``)."""
    return LambdaError(400, "ValidationException", f"1 validation error detected: {message}")


def iso_time_ms(t: float) -> str:
    """Lambda's LastModified shape for a Unix time: ``2024-01-02T03:04:05.678+0000``."""
    whole = datetime.datetime.fromtimestamp(int(t), datetime.UTC)
    return whole.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(t * 1000) % 1000:03d}+0000"


def check_runtime(runtime: object, allowed: Sequence[str]) -> str:
    """One of ``allowed`` (the runtimes the host found, passed in by the catalog)."""
    if not isinstance(runtime, str) or runtime not in allowed:
        message = (f"Value {runtime} at 'runtime' failed to satisfy constraint: Member must "
                   f"satisfy enum value set: {list(allowed)} (runtimes found on this host)")
        if isinstance(runtime, str) and runtime.startswith("nodejs"):
            node = [r for r in allowed if r.startswith("nodejs")]
            message += (f"; Node.js runtimes on this host: {node}" if node else
                        "; no Node.js runtime is installed on this host (scripts/setup.sh "
                        "installs nodejs20.x, nodejs22.x and nodejs24.x)")
        raise errors.invalid(message)
    return runtime


def check_description(value: object, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(value, str):
        raise errors.invalid("Description must be a string")
    if len(value) > limits.description_chars_max:
        raise validation_error(
            f"Value at 'description' failed to satisfy constraint: Member must "
            f"have length less than or equal to {limits.description_chars_max}"
        )
    return value


def check_tags(value: object, limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid("Tags must be a map of string to string")
    if len(value) > limits.tags_per_function_max:
        raise errors.invalid(f"A function can have at most {limits.tags_per_function_max} tags")
    for k, v in value.items():
        if (not isinstance(k, str) or not 1 <= len(k) <= limits.tag_key_chars_max
                or k.startswith("aws:")):
            raise errors.invalid(f"Invalid tag key {k!r}: 1-{limits.tag_key_chars_max} "
                                 "characters, not 'aws:'")
        if not isinstance(v, str) or len(v) > limits.tag_value_chars_max:
            raise errors.invalid(f"Invalid value for tag {k!r}: a string of at most "
                                 f"{limits.tag_value_chars_max} characters")
    return dict(value)


def check_role(value: object, limits: Limits = DEFAULT_LIMITS) -> str:
    if not isinstance(value, str) or len(value) > limits.role_chars_max:
        raise errors.invalid("Role must be an IAM role ARN")
    return value


def check_ephemeral_mb(size: object, limits: Limits = DEFAULT_LIMITS) -> int:
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not limits.ephemeral_mb_min <= size <= limits.ephemeral_mb_max
    ):
        raise errors.invalid(
            f"EphemeralStorage.Size must be between {limits.ephemeral_mb_min} "
            f"and {limits.ephemeral_mb_max} MB"
        )
    return size


def check_zip_only(doc: dict[str, Any]) -> None:
    """What this host runs: x86_64, zip packages."""
    if "Architectures" in doc and doc["Architectures"] not in (None, ["x86_64"]):
        raise errors.invalid("Only the x86_64 architecture is supported on this host")
    if doc.get("PackageType") not in (None, "Zip"):
        raise errors.invalid("Only PackageType Zip is supported")


def opt_dict(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """An optional nested object of a request (absent or null: empty)."""
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid(f"{key} must be an object")
    return value


def check_revision(doc: dict[str, Any], current: str) -> None:
    """A request's ``RevisionId`` (optional) must name the current revision."""
    rid = doc.get("RevisionId")
    if rid is not None and rid != current:
        raise LambdaError(
            412,
            "PreconditionFailedException",
            "The Revision Id provided does not match the latest Revision Id. "
            "Call the GetFunction/GetAlias API to retrieve the latest "
            "Revision Id",
        )


def version_number(version: str) -> int | None:
    """A published version's number; None for ``$LATEST`` or an alias name."""
    return int(version) if VERSION.match(version) else None


def check_alias_version(primary: object) -> str:
    """An alias's FunctionVersion: ``$LATEST`` or a version number."""
    if not isinstance(primary, str) or not (primary == "$LATEST" or VERSION.match(primary)):
        raise validation_error(
            f"Value '{primary}' at 'functionVersion' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: "
            "(\\$LATEST|[0-9]+)"
        )
    return primary


# -- concurrency ------------------------------------------------------------------------------
def check_reserved_concurrency(n: object, others_total: int,
                               limits: Limits = DEFAULT_LIMITS) -> int:
    """``ReservedConcurrentExecutions``, given what the account's other functions reserve."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise errors.invalid("ReservedConcurrentExecutions must be an integer >= 0")
    if others_total + n > limits.account_concurrency_max - limits.unreserved_concurrency_min:
        raise errors.invalid(
            f"Specified ReservedConcurrentExecutions for function decreases account's "
            f"UnreservedConcurrentExecution below its minimum value of "
            f"[{limits.unreserved_concurrency_min}]."
        )
    return n


def check_provisioned_concurrency(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise errors.invalid("ProvisionedConcurrentExecutions must be an integer >= 1")
    return n


def check_provisioned_qualifier(qualifier: str) -> None:
    if not qualifier or qualifier == "$LATEST":
        raise errors.invalid("Provisioned concurrency needs a published version or an alias "
                             "as Qualifier ($LATEST cannot be provisioned)")


def check_provisioned_within_reserved(n: int, reserved: int | None) -> None:
    if reserved is not None and n > reserved:
        raise errors.invalid(f"Requested Provisioned Concurrency ({n}) should not be greater "
                             f"than the reservedConcurrentExecution for function ({reserved})")


# -- layers -----------------------------------------------------------------------------------
def check_layer_refs(value: object, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """A function's ``Layers``: at most ``layers_per_function_max`` layer version ARNs."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.invalid("Layers must be a list of layer version ARNs")
    if len(value) > limits.layers_per_function_max:
        raise errors.invalid(
            f"Cannot reference more than {limits.layers_per_function_max} layers.")
    return list(value)


def parse_layer_version_arn(arn: str) -> tuple[str, str, str, int]:
    """(region, account, layer name, version) of a layer version ARN."""
    m = LAYER_VERSION_ARN.match(arn)
    if m is None:
        raise validation_error(
            f"Value '{arn}' at 'layers' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: "
            "arn:aws:lambda:REGION:ACCOUNT:layer:NAME:VERSION"
        )
    return m.group("region"), m.group("account"), m.group("name"), int(m.group("version"))


def check_distinct_layers(layer_names: Sequence[str]) -> None:
    if len(set(layer_names)) != len(layer_names):
        raise errors.invalid("Two different versions of the same layer are not allowed.")


def check_total_size(unzipped_bytes: int, layers: Sequence[dict[str, Any]],
                     limits: Limits = DEFAULT_LIMITS) -> None:
    """The function's code and its layers, unzipped, within ``unzipped_bytes_max``."""
    total = unzipped_bytes + sum(int(layer["unzipped"]) for layer in layers)
    if total > limits.unzipped_bytes_max:
        raise errors.invalid(
            f"Function code combined with layers exceeds the maximum allowed size of "
            f"{limits.unzipped_bytes_max} bytes. The actual size is {total} bytes."
        )


def check_layer_metadata(doc: dict[str, Any], limits: Limits = DEFAULT_LIMITS
                         ) -> tuple[list[str], list[str], str]:
    """PublishLayerVersion's CompatibleRuntimes, CompatibleArchitectures and LicenseInfo."""
    runtimes = doc.get("CompatibleRuntimes") or []
    archs = doc.get("CompatibleArchitectures") or []
    if (
        not isinstance(runtimes, list)
        or len(runtimes) > limits.layer_runtimes_max
        or not all(isinstance(r, str) and 0 < len(r) <= limits.runtime_chars_max
                   for r in runtimes)
    ):
        raise errors.invalid(f"CompatibleRuntimes must be a list of at most "
                             f"{limits.layer_runtimes_max} runtimes")
    if (
        not isinstance(archs, list)
        or len(archs) > len(ARCHITECTURES)
        or not all(a in ARCHITECTURES for a in archs)
    ):
        raise errors.invalid("CompatibleArchitectures must be a list of x86_64 and arm64")
    license_info = doc.get("LicenseInfo") or ""
    if not isinstance(license_info, str) or len(license_info) > limits.license_chars_max:
        raise errors.invalid(f"LicenseInfo must be a string of at most "
                             f"{limits.license_chars_max} characters")
    return list(runtimes), list(archs), license_info


# -- list paging ------------------------------------------------------------------------------
def page_size(raw: str | None, limits: Limits = DEFAULT_LIMITS) -> int:
    """MaxItems: 1-10,000 as Lambda's model allows; a page holds at most
    ``list_page_items_max``."""
    if raw is None or raw == "":
        return limits.list_page_items_max
    try:
        n = int(raw)
    except ValueError:
        raise errors.invalid("MaxItems must be an integer") from None
    if not 1 <= n <= limits.list_max_items_max:
        raise validation_error(
            f"Value '{n}' at 'maxItems' failed to satisfy constraint: Member must "
            f"have value between 1 and {limits.list_max_items_max}"
        )
    return min(n, limits.list_page_items_max)


def decode_marker(marker: str | None) -> str:
    """The position a list page continues after ("" for the first page)."""
    if not marker:
        return ""
    try:
        return base64.urlsafe_b64decode(marker.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid("Invalid Marker") from None


def encode_marker(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def decode_int_marker(marker: str | None, first: int) -> int:
    """A marker that holds a number (versions, layer versions); ``first`` without one."""
    raw = decode_marker(marker)
    if not raw:
        return first
    try:
        return int(raw)
    except ValueError:
        raise errors.invalid("Invalid Marker") from None
