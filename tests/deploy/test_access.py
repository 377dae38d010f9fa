"""The server's access rules as plain functions (the live server's answers: tests/deploy/test_serve.py)."""
import pytest

from core.deploy.access import _host_name, allowed_hosts, check_bind, is_loopback
from core.errors import UserError


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_key(host):
    assert is_loopback(host) and check_bind(host, None, no_auth=False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "inspection-pc.local"])
def test_a_network_address_needs_a_key_or_an_explicit_no_auth(host):
    with pytest.raises(UserError, match="--api-key"):
        check_bind(host, None, no_auth=False)
    assert check_bind(host, "k", no_auth=False) is None
    assert "without an API key" in check_bind(host, None, no_auth=True)


def test_host_names_as_a_header_gives_them():
    assert _host_name("Example.COM:8000") == "example.com"
    assert _host_name("[::1]:8000") == "::1"
    assert _host_name("::1") == "::1"
    assert _host_name("localhost") == "localhost"


def test_the_allow_list_is_loopback_the_bound_address_and_what_the_user_adds():
    assert set(allowed_hosts("0.0.0.0", None)) == {"localhost", "127.0.0.1", "::1"}
    assert "10.0.0.5" in allowed_hosts("10.0.0.5", None)
    assert "line-7.local" in allowed_hosts("0.0.0.0", ["Line-7.local"])
