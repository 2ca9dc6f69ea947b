"""What a socket's peer probably is, from its well-known port (issue 13).

A guess from the port alone (`127.0.0.1:5432 (PostgreSQL?)`): nothing here speaks to the peer.
"""

from __future__ import annotations

import re

# Well-known port -> (service, how the report writes it).
PORT_SERVICES: dict[int, tuple[str, str]] = {
    20: ("ftp-data", "FTP data"),
    21: ("ftp", "FTP"),
    22: ("ssh", "SSH"),
    25: ("smtp", "SMTP"),
    53: ("dns", "DNS"),
    80: ("http", "HTTP"),
    110: ("pop3", "POP3"),
    143: ("imap", "IMAP"),
    389: ("ldap", "LDAP"),
    443: ("https", "HTTPS"),
    465: ("smtps", "SMTPS"),
    587: ("smtp", "SMTP"),
    636: ("ldaps", "LDAPS"),
    993: ("imaps", "IMAPS"),
    1433: ("mssql", "SQL Server"),
    1521: ("oracle", "Oracle"),
    2181: ("zookeeper", "ZooKeeper"),
    2379: ("etcd", "etcd"),
    3306: ("mysql", "MySQL"),
    4222: ("nats", "NATS"),
    5432: ("postgresql", "PostgreSQL"),
    5672: ("amqp", "AMQP"),
    6379: ("redis", "Redis"),
    8086: ("influxdb", "InfluxDB"),
    8125: ("statsd", "StatsD"),
    9042: ("cassandra", "Cassandra"),
    9092: ("kafka", "Kafka"),
    9200: ("elasticsearch", "Elasticsearch"),
    11211: ("memcached", "memcached"),
    27017: ("mongodb", "MongoDB"),
}
LABELS = dict(PORT_SERVICES.values())
# "127.0.0.1:5432", "[::1]:5432", "db.internal:5432" (the addr event's path of an IP socket).
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.%\w]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})$")


def port_of(path: object) -> int | None:
    """The port of an IP socket address, None for anything else (unix sockets, no address)."""
    if not isinstance(path, str):
        return None
    match = _HOST_PORT.match(path)
    return int(match.group("port")) if match else None


def service_of(kind: object, path: object) -> str | None:
    """The service a socket's peer probably is (`postgresql`), None when not well known."""
    if kind != "socket":
        return None
    port = port_of(path)
    found = PORT_SERVICES.get(port) if port is not None else None
    return found[0] if found else None


def label(service: str | None) -> str:
    """How the report names a service (`PostgreSQL`)."""
    return LABELS.get(service or "", service or "")


def describe_peer(path: object, service: str | None) -> str:
    """`127.0.0.1:5432 (PostgreSQL?)`: the address, and what it probably is."""
    text = str(path) if isinstance(path, str) and path else "(no address recorded)"
    return f"{text} ({label(service)}?)" if service else text
