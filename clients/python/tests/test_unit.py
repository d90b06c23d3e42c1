"""Unit tests that need no cluster: 128-bit conversion, range checks, options. The conformance
scenario (tests/conformance.py) runs the client against a real cluster."""

import time
import unittest

from tally_client import U128_MAX, Client, CreateTransferStatus, Transfer, TransferFlags, Unavailable
from tally_client._pb import ledger_pb2 as pb
from tally_client.types import from_pb, to_pb


class Conversions(unittest.TestCase):
    def test_128_bit_values_survive_the_wire_form(self):
        for value in [0, 1, (1 << 64) - 1, 1 << 64, (0xC0FFEE << 80) | 7, U128_MAX]:
            transfer = Transfer(id=value, amount=value, flags=TransferFlags.PENDING, timestamp=(1 << 64) - 1)
            self.assertEqual(from_pb(pb.Transfer.FromString(to_pb(transfer, pb.Transfer).SerializeToString()), Transfer), transfer)

    def test_out_of_range_values_are_refused_before_they_are_sent(self):
        with self.assertRaisesRegex(ValueError, "id must be between 0 and 2\\^128-1"):
            to_pb(Transfer(id=-1), pb.Transfer)
        with self.assertRaisesRegex(ValueError, "amount must be between"):
            to_pb(Transfer(id=1, amount=U128_MAX + 1), pb.Transfer)
        with self.assertRaisesRegex(ValueError, "user_data_64 must be between 0 and 2\\^64-1"):
            to_pb(Transfer(id=1, user_data_64=1 << 64), pb.Transfer)
        with self.assertRaisesRegex(ValueError, "code must be between 0 and 2\\^32-1"):
            to_pb(Transfer(id=1, code=-5), pb.Transfer)
        with self.assertRaisesRegex(TypeError, "id must be an int"):
            to_pb(Transfer(id="1"), pb.Transfer)

    def test_the_enums_come_from_ledger_proto(self):
        self.assertEqual(CreateTransferStatus.EXISTS, 18)
        self.assertEqual(CreateTransferStatus.ID_ALREADY_FAILED, 59)
        self.assertEqual(CreateTransferStatus(57).name, "EXCEEDS_CREDITS")


class Options(unittest.TestCase):
    def test_bad_options_are_refused_with_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, "no node addresses"):
            Client([])
        with self.assertRaisesRegex(ValueError, "not host:port"):
            Client(["localhost"], insecure=True)
        with self.assertRaisesRegex(ValueError, "TLS needs the cluster's CA"):
            Client(["127.0.0.1:7101"])
        with self.assertRaisesRegex(ValueError, "cannot read /nonexistent.pem"):
            Client(["127.0.0.1:7101"], ca="/nonexistent.pem")
        with self.assertRaisesRegex(ValueError, "holds no PEM certificate"):
            Client(["127.0.0.1:7101"], ca=__file__)
        with self.assertRaisesRegex(ValueError, "both cert and key"):
            Client(["127.0.0.1:7101"], ca=__file__, cert=__file__)

    def test_a_cluster_that_is_not_there_is_unavailable_within_the_deadline(self):
        client = Client(["127.0.0.1:1", "127.0.0.1:2"], insecure=True, timeout_s=0.4)
        started = time.monotonic()
        with self.assertRaisesRegex(Unavailable, "no node answered in time"):
            client.lookup_accounts([1])
        self.assertLess(time.monotonic() - started, 3)
        client.close()


if __name__ == "__main__":
    unittest.main()
