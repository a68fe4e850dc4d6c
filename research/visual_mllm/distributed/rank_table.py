"""HCCL rank tables for one Ascend server: generate one (the `hccl_tools.py` job) and explain a bad one.

A rank table lists the devices of a data-parallel job:
    {"version": "1.0", "server_count": "1",
     "server_list": [{"server_id": HOST_IP, "host_nic_ip": "reserve",
                      "device": [{"device_id": "0", "device_ip": DEVICE_IP, "rank_id": "0"}, ...]}],
     "status": "completed"}
Every value is a string. On CPU (msrun workers) no rank table is needed.
"""
import ipaddress
import json
import os
import re
import socket
import subprocess

from ..atomic import write_text_atomic
from ..json_file import read_json

HCCN_CONF = "/etc/hccn.conf"


class RankTableError(ValueError):
    """A rank table, or the request to build one, is wrong; the message says what and where."""


def parse_device_range(text):
    """'[0,8)' -> [0, 1, ..., 7]; any non-negative bounds, e.g. '[8,16)'."""
    match = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\)\s*", str(text))
    if not match:
        raise RankTableError(f"device range {text!r} must look like '[START,END)', e.g. '[0,8)'")
    start, end = int(match.group(1)), int(match.group(2))
    if end <= start:
        raise RankTableError(f"device range {text!r} is empty: END must be greater than START")
    return list(range(start, end))


def _valid_ip(text):
    try:
        ipaddress.IPv4Address(str(text))
        return True
    except ValueError:
        return False


def device_ip_from_hccn_tool(device_id):
    """The device's IP as `hccn_tool -i ID -ip -g` prints it, or None when the tool is absent."""
    try:
        out = subprocess.run(["hccn_tool", "-i", str(device_id), "-ip", "-g"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"ipaddr:\s*([\d.]+)", out)
    return match.group(1) if match else None


def device_ips_from_hccn_conf(path=HCCN_CONF):
    """{device id: ip} from `address_ID=IP` lines of hccn.conf ({} when the file is absent)."""
    if not os.path.isfile(path):
        return {}
    ips = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            match = re.fullmatch(r"\s*address_(\d+)\s*=\s*([\d.]+)\s*", line)
            if match:
                ips[int(match.group(1))] = match.group(2)
    return ips


def host_ip():
    """This host's outward IPv4 address (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def build_rank_table(device_ids, server_ip, device_ips):
    """The rank table dict; device_ips maps every device id to its IP."""
    missing = [d for d in device_ids if d not in device_ips]
    if missing:
        raise RankTableError(f"no IP found for device(s) {missing}: neither `hccn_tool -i ID -ip -g` nor "
                             f"{HCCN_CONF} (lines address_ID=IP) gave one")
    devices = [{"device_id": str(d), "device_ip": device_ips[d], "rank_id": str(rank)}
               for rank, d in enumerate(device_ids)]
    table = {"version": "1.0", "server_count": "1",
             "server_list": [{"server_id": server_ip, "device": devices, "host_nic_ip": "reserve"}],
             "status": "completed"}
    validate_rank_table(table)
    return table


def rank_table_file_name(device_ids, server_ip):
    """hccl_{N}p_{ids}_{host}.json as the MindFormers tool names it (ids joined, e.g. 01234567)."""
    return f"hccl_{len(device_ids)}p_{''.join(str(d) for d in device_ids)}_{server_ip}.json"


def generate(device_range, output_dir=".", server_ip=None, hccn_conf=HCCN_CONF):
    """Write the rank table for the devices of `device_range` and return its path."""
    device_ids = parse_device_range(device_range)
    server_ip = server_ip or host_ip()
    conf = device_ips_from_hccn_conf(hccn_conf)
    ips = {}
    for d in device_ids:
        ip = device_ip_from_hccn_tool(d) or conf.get(d)
        if ip:
            ips[d] = ip
    table = build_rank_table(device_ids, server_ip, ips)
    path = os.path.join(output_dir, rank_table_file_name(device_ids, server_ip))
    return write_text_atomic(path, json.dumps(table, indent=4))


def _require(condition, message):
    if not condition:
        raise RankTableError(message)


def validate_rank_table(table, rank_size=None, device_ids=None):
    """Raise RankTableError explaining the first thing wrong with a rank-table dict."""
    _require(isinstance(table, dict), "the rank table must be a JSON object")
    for key in ("version", "server_count", "server_list", "status"):
        _require(key in table, f"missing top-level key {key!r}")
    _require(table["status"] == "completed", f"status is {table['status']!r}; it must be \"completed\"")
    servers = table["server_list"]
    _require(isinstance(servers, list) and servers, "server_list must be a non-empty list")
    _require(isinstance(table["server_count"], str) and table["server_count"] == str(len(servers)),
             f"server_count is {table['server_count']!r} but server_list has {len(servers)} server(s); "
             "it must be that number as a string")
    ranks, seen_devices = [], set()
    for s, server in enumerate(servers):
        where = f"server_list[{s}]"
        _require(isinstance(server, dict) and "server_id" in server and "device" in server,
                 f"{where} needs server_id and device")
        _require(_valid_ip(server["server_id"]), f"{where}.server_id {server['server_id']!r} is not an IPv4 address")
        local = set()
        for d, device in enumerate(server["device"]):
            at = f"{where}.device[{d}]"
            for key in ("device_id", "device_ip", "rank_id"):
                _require(key in device, f"{at} is missing {key!r}")
                _require(isinstance(device[key], str), f"{at}.{key} is {device[key]!r}: values must be strings")
            _require(device["device_id"].isdigit(), f"{at}.device_id {device['device_id']!r} is not a number")
            _require(device["rank_id"].isdigit(), f"{at}.rank_id {device['rank_id']!r} is not a number")
            _require(_valid_ip(device["device_ip"]), f"{at}.device_ip {device['device_ip']!r} is not an IPv4 address")
            _require(device["device_id"] not in local, f"{at}: device_id {device['device_id']} is listed twice")
            _require(device["device_ip"] not in seen_devices, f"{at}: device_ip {device['device_ip']} is listed twice")
            local.add(device["device_id"])
            seen_devices.add(device["device_ip"])
            ranks.append(int(device["rank_id"]))
    _require(sorted(ranks) == list(range(len(ranks))),
             f"rank_id values {sorted(ranks)} must be 0..{len(ranks) - 1}, each once")
    if rank_size is not None:
        _require(int(rank_size) == len(ranks), f"RANK_SIZE {rank_size} but the rank table lists {len(ranks)} device(s)")
    if device_ids is not None:
        listed = sorted(int(d["device_id"]) for server in servers for d in server["device"])
        _require(sorted(device_ids) == listed,
                 f"devices {sorted(device_ids)} requested but the rank table lists {listed}")


def validate_rank_table_file(path, rank_size=None, device_range=None):
    table = read_json(path, RankTableError, "rank table")
    device_ids = parse_device_range(device_range) if device_range is not None else None
    try:
        validate_rank_table(table, rank_size, device_ids)
    except RankTableError as err:
        raise RankTableError(f"rank table {path}: {err}") from err
