import socket

import pytest

from realhf.base import network


def _occupy():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, s.getsockname()[1]


def test_find_free_port_is_bindable_and_in_range():
    port = network.find_free_port(low=20000, high=30000)
    assert 20000 <= port < 30000
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def test_occupied_port_is_skipped():
    sock, port = _occupy()
    try:
        assert not network.is_port_free(port)
        with pytest.raises(RuntimeError, match="No free port"):
            network.find_free_port(low=port, high=port + 1)
    finally:
        sock.close()


def test_exclude_is_respected():
    sock, port = _occupy()
    sock.close()
    if not network.is_port_free(port + 1) or port + 2 > 65536:
        pytest.skip("neighbouring port busy")
    assert network.find_free_port(low=port, high=port + 2, exclude=[port]) == port + 1


def test_ports_are_not_handed_out_twice():
    sock, port = _occupy()
    sock.close()
    if not network.is_port_free(port + 1) or port + 2 > 65536:
        pytest.skip("neighbouring port busy")
    first = network.find_free_port(low=port, high=port + 2)
    second = network.find_free_port(low=port, high=port + 2)
    assert {first, second} == {port, port + 1}


def test_find_multiple_free_ports():
    ports = network.find_multiple_free_ports(5, low=30000, high=40000)
    assert len(ports) == len(set(ports)) == 5
    assert all(30000 <= p < 40000 for p in ports)
    for p in ports:
        assert network.is_port_free(p)


def test_invalid_range():
    with pytest.raises(ValueError):
        network.find_free_port(low=100, high=100)


def test_host_ip_and_name(monkeypatch):
    monkeypatch.delenv("REAL_HOST_IP", raising=False)
    assert network.gethostip() == "127.0.0.1"
    assert isinstance(network.gethostip(loopback=False), str)
    monkeypatch.setenv("REAL_HOST_IP", "10.1.2.3")
    assert network.gethostip() == "10.1.2.3"
    assert network.gethostip(loopback=False) == "10.1.2.3"
    assert network.gethostname() == socket.gethostname()


def test_select_host_ip_rule(monkeypatch):
    monkeypatch.setattr(network, "routable_ip", lambda: "10.9.8.7")
    assert network.select_host_ip("", multi=False) == "127.0.0.1"
    assert network.select_host_ip("", multi=True) == "10.9.8.7"
    assert network.select_host_ip("", multi=False, loopback=False) == "10.9.8.7"
    assert network.select_host_ip("10.1.1.1", multi=True) == "10.1.1.1"


def test_multi_node_env_binds_routable_address(monkeypatch):
    monkeypatch.delenv("REAL_HOST_IP", raising=False)
    monkeypatch.delenv("REAL_MULTI_NODE", raising=False)
    assert not network.multi_node() and network.gethostip() == "127.0.0.1"
    monkeypatch.setenv("REAL_MULTI_NODE", "1")
    assert network.multi_node()
    ip = network.gethostip()
    assert ip == network.routable_ip()
    if ip != "127.0.0.1":  # a host with a non-loopback interface: it is really ours
        assert not ip.startswith("127.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    monkeypatch.setenv("REAL_HOST_IP", "10.1.2.3")
    assert network.gethostip() == "10.1.2.3"
    monkeypatch.setenv("REAL_MULTI_NODE", "0")
    monkeypatch.delenv("REAL_HOST_IP")
    assert network.gethostip() == "127.0.0.1"


def test_routable_ip_skips_loopback_resolution(monkeypatch):
    class NoRoute(socket.socket):
        def connect(self, addr):
            raise OSError("unreachable")

    monkeypatch.setattr(network.socket, "socket", NoRoute)
    monkeypatch.setattr(network.socket, "gethostbyname_ex", lambda h: (h, [], ["127.0.1.1", "10.0.0.5"]))
    assert network.routable_ip() == "10.0.0.5"
    monkeypatch.setattr(network.socket, "gethostbyname_ex", lambda h: (h, [], ["127.0.1.1"]))
    assert network.routable_ip() == "127.0.0.1"
