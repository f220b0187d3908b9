"""Who may do what, the rules alone: Host names, origins, the operator's credential."""

import pytest

from pipeline.app.access import (
    OperatorCredential,
    allowed_hosts,
    cross_origin,
    host_allowed,
    host_name,
)


@pytest.mark.parametrize("header, name", [("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"),
                                          ("[::1]:8000", "::1"), ("[::1]", "::1"), ("::1", "::1"),
                                          ("photos.example.org:443", "photos.example.org")])
def test_host_names_lose_their_port_ipv6_included(header, name):
    assert host_name(header) == name


def test_an_app_on_loopback_answers_loopback_names_only():
    hosts = allowed_hosts("127.0.0.1", [])
    assert all(host_allowed(h, hosts) for h in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000"))
    assert not host_allowed("evil.example:8000", hosts) and not host_allowed("", hosts)
    listed = allowed_hosts("0.0.0.0", ["photos.example.org", "*.intranet.example"])
    assert host_allowed("photos.example.org", listed) and host_allowed("a.intranet.example", listed)
    assert not host_allowed("evil.example", listed) and not host_allowed("intranet.example.evil", listed)
    assert host_allowed("anything", allowed_hosts("0.0.0.0", []))


def test_only_this_apps_pages_may_change_something():
    own = {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}
    assert cross_origin("POST", own, "http") is None
    assert cross_origin("POST", {"host": "127.0.0.1:8000"}, "http") is None  # curl: no browser headers
    assert cross_origin("POST", {**own, "origin": "null"}, "http")  # a sandboxed frame
    assert cross_origin("DELETE", {**own, "origin": "http://evil.example"}, "http")
    assert cross_origin("POST", {**own, "sec-fetch-site": "same-site"}, "http")
    assert cross_origin("POST", own, "https")  # the page's origin is http, the request says https
    assert cross_origin("GET", {**own, "origin": "http://evil.example"}, "http") is None  # reads change nothing


def test_the_operator_credential():
    with pytest.raises(ValueError, match="shorter than 16"):
        OperatorCredential("short")
    nobody = OperatorCredential(None)
    assert not nobody.configured and not nobody.holds("Bearer ")
    operator = OperatorCredential("s3cret-operator-token")
    assert operator.holds("Bearer s3cret-operator-token") and operator.holds("bearer  s3cret-operator-token")
    for wrong in ("s3cret-operator-token", "Basic s3cret-operator-token", "Bearer s3cret-operator-tokeN",
                  "Bearer \u00e9", None, ""):
        assert not operator.holds(wrong), wrong
