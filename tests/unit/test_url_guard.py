"""The SSRF guard of URL imports, digest parsing and URL redaction (no network)."""

from __future__ import annotations

import ipaddress

import pytest

from bmi_server.adapters.url_guard import UrlPolicy, parse_hosts
from bmi_server.core import digests, errors
from bmi_server.core.urls import redact

OWN = {ipaddress.ip_address("192.0.2.10")}
DNS = {
    "mirror.example.org": ["198.51.100.7"],
    "cdn.mirror.example.org": ["198.51.100.8"],
    "sneaky.example.org": ["198.51.100.9", "127.0.0.1"],
    "self.example.org": ["192.0.2.10"],
    "metadata.example.org": ["169.254.169.254"],
    "mapped.example.org": ["::ffff:127.0.0.1"],
    "multi.example.org": ["224.0.0.1"],
    "zero.example.org": ["0.0.0.0"],
}


def policy(hosts, schemes="https,http"):
    return UrlPolicy(hosts, schemes, resolver=lambda host, port: DNS[host],
                     own_addresses=lambda: OWN)


def test_an_allowed_host_is_checked_and_pinned_to_the_address_resolved():
    target = policy("mirror.example.org").check("https://mirror.example.org/a/b.img?x=1")
    assert target.address == "198.51.100.7" and target.host == "mirror.example.org"
    assert target.port == 443 and target.url == "https://mirror.example.org/a/b.img?x=1"


@pytest.mark.parametrize("url", [
    "https://other.example.org/x",          # not listed
    "https://example.org.evil.net/x",       # suffix games
    "https://mirror.example.org.evil/x",
    "https://198.51.100.7/x",               # the address of a listed name, not listed itself
])
def test_hosts_not_listed_are_refused(url):
    with pytest.raises(errors.PermissionDenied, match="not allowed"):
        policy("mirror.example.org").check(url)


def test_a_wildcard_allows_names_below_it_only():
    p = policy("*.mirror.example.org")
    assert p.check("https://cdn.mirror.example.org/x").address == "198.51.100.8"
    with pytest.raises(errors.PermissionDenied):
        p.check("https://mirror.example.org/x")


def test_schemes_are_the_operators_choice():
    with pytest.raises(errors.PermissionDenied, match="scheme http"):
        policy("mirror.example.org", schemes="https").check("http://mirror.example.org/x")
    with pytest.raises(errors.InvalidArgument):
        policy("mirror.example.org").check("ftp://mirror.example.org/x")
    with pytest.raises(errors.InvalidArgument):
        policy("mirror.example.org").check("file:///etc/passwd")


@pytest.mark.parametrize("host, why", [
    ("sneaky.example.org", "loopback"),   # any refused address refuses the name
    ("self.example.org", "own"),
    ("metadata.example.org", "link-local"),
    ("mapped.example.org", "loopback"),
    ("multi.example.org", "multicast"),
    ("zero.example.org", "unspecified"),
])
def test_special_and_own_addresses_are_refused_even_for_listed_names(host, why):
    with pytest.raises(errors.PermissionDenied, match=why):
        policy(host).check(f"http://{host}/x")


def test_loopback_is_allowed_only_when_its_address_is_listed():
    with pytest.raises(errors.PermissionDenied, match="not allowed"):
        policy("localhost").check("http://127.0.0.1:8000/x")
    target = policy("127.0.0.1").check("http://127.0.0.1:8000/x")
    assert (target.address, target.port) == ("127.0.0.1", 8000)
    assert policy("127.0.0.0/8").check("http://127.0.0.5/x").address == "127.0.0.5"
    with pytest.raises(errors.PermissionDenied, match="loopback"):
        # listed as a name, but resolving to loopback: refused
        UrlPolicy("sneaky.example.org", "http", resolver=lambda h, p: ["127.0.0.1"],
                  own_addresses=set).check("http://sneaky.example.org/x")


def test_credentials_are_split_off_and_never_shown():
    target = policy("mirror.example.org").check("https://bob:s3cret@mirror.example.org/i.raw")
    assert target.auth == ("bob", "s3cret")
    assert "s3cret" not in target.url and "bob" not in target.url
    assert "s3cret" not in target.shown and "s3cret" not in repr(target)
    with pytest.raises(errors.PermissionDenied) as refused:
        policy("x.example.org").check("https://bob:s3cret@mirror.example.org/i.raw")
    assert "s3cret" not in refused.value.message and "bob" not in refused.value.message


def test_empty_setting_is_off_and_bad_entries_are_refused():
    assert not policy("").enabled and policy("a.example.org").enabled
    assert parse_hosts(" A.example.org. , 10.0.0.0/8,[fd00::1]")[0] == ["a.example.org"]
    for bad in ("http://a.example.org", "a.example.org/x", "user@a", "*"):
        with pytest.raises(errors.InvalidArgument):
            parse_hosts(bad)


def test_redaction_drops_credentials_and_query():
    assert redact("https://u:p@Host.example:8443/a/b?token=x#f") == \
        "https://host.example:8443/a/b?…"
    assert redact("http://[::1]/x") == "http://[::1]/x"
    with pytest.raises(errors.InvalidArgument) as bad:
        redact("gopher://u:secret@x/")
    assert "secret" not in bad.value.message


def test_digests_parse_sha256_and_sha512_only():
    hex64, hex128 = "ab" * 32, "CD" * 64
    assert str(digests.parse(f"sha256:{hex64}")) == f"sha256:{hex64}"
    assert digests.parse(f" SHA512:{hex128} ").hex == hex128.lower()
    for bad in (hex64, f"md5:{'a' * 32}", f"sha1:{'a' * 40}", f"sha256:{hex64[:-1]}",
                f"sha256:{'g' * 64}", "sha256:", ""):
        with pytest.raises(errors.InvalidArgument):
            digests.parse(bad)


def test_holes_hash_as_zeros():
    import hashlib

    h = digests.new_hasher()
    h.update(b"x")
    digests.update_zeros(h, (4 << 20) * 2 + 3)
    assert h.hexdigest() == hashlib.sha256(b"x" + bytes((4 << 20) * 2 + 3)).hexdigest()


def test_the_fetcher_connects_to_the_address_it_checked_and_follows_checked_redirects():
    """``mirror.test`` exists in no DNS: the fetch reaches the server only because the
    connection goes to the address the policy resolved (pinned), with the URL's host in
    the Host header."""
    import http.server
    import threading

    from bmi_server.adapters.http_fetcher import HttpFetcher

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers["Host"]))
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/file")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.test/file")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"hello")

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    port = web.server_address[1]
    try:
        pinned = UrlPolicy("mirror.test,127.0.0.1", "http",
                           resolver=lambda host, p: {"mirror.test": ["127.0.0.1"]}[host],
                           own_addresses=set)
        fetcher = HttpFetcher(pinned, max_bytes=100)
        download = fetcher.open(f"http://mirror.test:{port}/hop")
        try:
            assert download.total_bytes == 5 and b"".join(download.chunks()) == b"hello"
        finally:
            download.close()
        assert seen == [("/hop", f"mirror.test:{port}"), ("/file", f"mirror.test:{port}")]
        with pytest.raises(errors.PermissionDenied, match="redirects elsewhere"):
            fetcher.open(f"http://mirror.test:{port}/away")
        small = HttpFetcher(pinned, max_bytes=4)
        with pytest.raises(errors.InvalidArgument, match="limit"):
            small.open(f"http://mirror.test:{port}/file")
    finally:
        web.shutdown()
        web.server_close()


HOSTILE_DNS = {**DNS, "evil.net": ["203.0.113.5"], "2130706433": ["127.0.0.1"],
               "0x7f.0.0.1": ["127.0.0.1"], "lo6.example.org": ["::1"],
               "zone.example.org": ["fe80::1%eth0"], "v6.example.org": ["2001:db8::7"]}


def hostile_policy(hosts):
    return UrlPolicy(hosts, "https,http", resolver=lambda host, port: HOSTILE_DNS[host],
                     own_addresses=lambda: OWN)


@pytest.mark.parametrize("url", [
    "https://mirror.example.org@evil.net/x",     # the listed name as a user name
    "https://evil.net#@mirror.example.org/x",    # ... after a fragment
    "https://evil.net?@mirror.example.org/x",    # ... after a query
])
def test_user_info_tricks_are_judged_by_the_real_host(url):
    with pytest.raises(errors.PermissionDenied, match=r"host evil\.net is not allowed"):
        hostile_policy("mirror.example.org").check(url)


def test_whatever_the_user_info_the_connection_goes_to_the_checked_host():
    target = hostile_policy("mirror.example.org").check(
        "https://evil.net\\@mirror.example.org/x")
    assert (target.host, target.address) == ("mirror.example.org", "198.51.100.7")
    assert "evil" not in target.url and "evil" not in target.shown


@pytest.mark.parametrize("url, why", [
    ("javascript:alert(1)", "http:// or https://"),
    ("data:text/plain,hi", "http:// or https://"),
    ("//mirror.example.org/x", "http:// or https://"),   # no scheme
    ("https:/mirror.example.org/x", "no host"),
    ("https://mirror.example.org:99999/x", "not a valid URL"),
    ("https://mirror.example.org:abc/x", "not a valid URL"),
    ("https://mirror.example.org:-1/x", "not a valid URL"),
    ("https://mirror.example.org/" + "a" * 3000, "longer than 2048"),
    ("https://mirror.example.org\r\nHost: evil/x", "not a valid URL"),
])
def test_malformed_and_odd_urls_are_invalid_and_never_echoed(url, why):
    with pytest.raises(errors.InvalidArgument, match=why) as refused:
        hostile_policy("mirror.example.org").check(url)
    assert "aaaa" not in refused.value.message and "evil" not in refused.value.message


def test_scheme_and_host_case_and_line_breaks_cannot_slip_through():
    p = hostile_policy("mirror.example.org")
    assert p.check("HTTPS://MIRROR.EXAMPLE.ORG/x").url == "https://mirror.example.org/x"
    # Python drops CR, LF and tab from URLs: nothing can be injected into the request.
    smuggled = p.check("https://mirror.example.org/x\r\nX-Injected: y")
    assert "\r" not in smuggled.url and "\n" not in smuggled.url


def test_ipv6_literals_and_names_follow_the_same_rules():
    with pytest.raises(errors.PermissionDenied, match="not allowed"):
        hostile_policy("mirror.example.org").check("https://[::1]/x")
    with pytest.raises(errors.PermissionDenied, match="not allowed"):
        # IPv4 loopback listed does not let it in through an IPv4-mapped IPv6 literal
        hostile_policy("127.0.0.1").check("https://[::ffff:127.0.0.1]/x")
    assert hostile_policy("::1").check("https://[::1]/x").address == "::1"
    listed = hostile_policy("2001:db8::/32").check("https://[2001:db8::7]:8443/x")
    assert (listed.address, listed.port, listed.url) == (
        "2001:db8::7", 8443, "https://[2001:db8::7]:8443/x")
    assert hostile_policy("v6.example.org").check("https://v6.example.org/x").address == \
        "2001:db8::7"
    for host, why in (("lo6.example.org", "loopback"), ("zone.example.org", "link-local")):
        with pytest.raises(errors.PermissionDenied, match=why):
            hostile_policy(host).check(f"https://{host}/x")


@pytest.mark.parametrize("host", ["2130706433", "0x7f.0.0.1"])
def test_numeric_host_spellings_are_names_checked_by_what_they_resolve_to(host):
    with pytest.raises(errors.PermissionDenied, match="loopback"):
        hostile_policy(host).check(f"http://{host}/x")


def test_digests_refuse_hostile_strings_without_echoing_them():
    hex64 = "ab" * 32
    for bad in (f"sha256:{hex64}a", f"sha256:{hex64[:32]} {hex64[32:]}",
                "sha256:" + "\u0661" * 64,   # Arabic-Indic digits: not hex
                "sha256:" + "\uff41" * 64,   # full-width a
                f"sha256::{hex64}", f"sha256:{hex64}\x00", "x" * 100_000 + ":" + hex64,
                "sha256:" + "a" * 100_000):
        with pytest.raises(errors.InvalidArgument) as refused:
            digests.parse(bad)
        assert len(refused.value.message) < 200
    assert str(digests.parse(f"\tsha256:{hex64}\n")) == f"sha256:{hex64}"


def test_redirect_loops_other_schemes_and_credentials_across_origins():
    import http.server
    import threading

    from bmi_server.adapters.http_fetcher import HttpFetcher

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append((self.path, self.headers["Host"].split(":")[0],
                         self.headers.get("Authorization")))
            port = self.server.server_address[1]
            hops = {"/loop": "/loop", "/file": "file:///etc/passwd",
                    "/gopher": "gopher://mirror.test/x", "/same": "/auth",
                    "/cross": f"http://other.test:{port}/auth"}
            if self.path in hops:
                self.send_response(302)
                self.send_header("Location", hops[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    port = web.server_address[1]
    # 127.0.0.1 is listed only so that this test's server may be reached.
    pinned = UrlPolicy("mirror.test,other.test,127.0.0.1", "http",
                       resolver=lambda host, p: ["127.0.0.1"], own_addresses=set)
    fetcher = HttpFetcher(pinned, max_bytes=100, max_redirects=2)
    try:
        with pytest.raises(errors.PermissionDenied, match="more than 2 redirects"):
            fetcher.open(f"http://mirror.test:{port}/loop")
        assert [path for path, _, _ in seen] == ["/loop"] * 3  # the first and 2 redirects
        for hop in ("/file", "/gopher"):
            with pytest.raises(errors.PermissionDenied, match="redirects elsewhere") as away:
                fetcher.open(f"http://u:secret@mirror.test:{port}{hop}")
            assert "secret" not in away.value.message
        seen.clear()
        for hop in ("/same", "/cross"):
            fetcher.open(f"http://u:secret@mirror.test:{port}{hop}").close()
        basic = seen[0][2]
        assert basic is not None and basic.startswith("Basic ")
        # Credentials follow a redirect within their origin, never to another one.
        assert seen == [("/same", "mirror.test", basic), ("/auth", "mirror.test", basic),
                        ("/cross", "mirror.test", basic), ("/auth", "other.test", None)]
    finally:
        web.shutdown()
        web.server_close()
