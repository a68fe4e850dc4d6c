"""Rank tables for Ascend data parallel: `generate` one for this server, or `validate` one.

    python -m visual_mllm.cli.rank_table generate --device_num "[0,8)"
    python -m visual_mllm.cli.rank_table validate hccl_8p_01234567_10.0.0.1.json --rank_size 8
"""
import argparse
import sys

from .common import fail_cleanly, parse_command_line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write hccl_{N}p_{ids}_{host}.json for devices [START,END)")
    gen.add_argument("--device_num", default="[0,8)", help="device id range, '[START,END)'")
    gen.add_argument("--server_ip", default=None, help="this host's IP (default: detected)")
    gen.add_argument("--hccn_conf", default="/etc/hccn.conf", help="fallback for device IPs (address_ID=IP)")
    gen.add_argument("--output_dir", default=".")
    val = sub.add_parser("validate", help="explain what is wrong with a rank table, if anything")
    val.add_argument("rank_table")
    val.add_argument("--rank_size", type=int, default=None, help="the RANK_SIZE the job will use")
    val.add_argument("--device_num", default=None, help="the device range '[START,END)' the job will use")
    return p


@fail_cleanly
def main(argv=None):
    from ..distributed import rank_table

    args = parse_command_line(build_parser(), argv)
    if args.command == "generate":
        print(rank_table.generate(args.device_num, args.output_dir, args.server_ip, args.hccn_conf))
    else:
        rank_table.validate_rank_table_file(args.rank_table, args.rank_size, args.device_num)
        print(f"{args.rank_table}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
