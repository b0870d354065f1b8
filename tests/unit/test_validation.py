import pytest

from cellcloud.core.errors import LambdaError
from cellcloud.core.validation import (
    check_env,
    check_handler,
    check_memory,
    check_name,
    check_timeout,
    parse_function_ref,
)


@pytest.mark.parametrize("name", ["f", "my-fn_1", "a" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a" * 65, "has space", "semi;colon", "ünï", None, 5])
def test_bad_names(name: object) -> None:
    with pytest.raises(LambdaError) as e:
        check_name(name)
    assert e.value.type == "ValidationException"


def test_function_refs() -> None:
    r = parse_function_ref("arn:aws:lambda:cc-local-1:123456789012:function:fn:$LATEST")
    assert (r.name, r.qualifier, r.account) == ("fn", "$LATEST", "123456789012")
    r = parse_function_ref("123456789012:function:fn")
    assert (r.name, r.account) == ("fn", "123456789012")
    with pytest.raises(LambdaError):
        parse_function_ref("../etc")


@pytest.mark.parametrize("value", [127, 10241, 0, True, "128", 128.0])
def test_memory_bounds(value: object) -> None:
    with pytest.raises(LambdaError):
        check_memory(value)


def test_memory_and_timeout_ok() -> None:
    assert check_memory(128) == 128 and check_memory(10240) == 10240
    assert check_timeout(1) == 1 and check_timeout(900) == 900
    with pytest.raises(LambdaError):
        check_timeout(901)


def test_handler() -> None:
    assert check_handler("app.handler") == "app.handler"
    assert check_handler("bootstrap-handles-it") == "bootstrap-handles-it"  # custom runtimes
    for bad in ("has space.x", "", None, "x" * 129):
        with pytest.raises(LambdaError):
            check_handler(bad)


def test_env_limits() -> None:
    assert check_env({"AB": "1"}) == {"AB": "1"}
    with pytest.raises(LambdaError):
        check_env({"AWS_REGION": "x"})
    with pytest.raises(LambdaError):
        check_env({"BIG": "x" * 5000})
    with pytest.raises(LambdaError):
        check_env({"1BAD": "x"})
