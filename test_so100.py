"""Tests of the Feetech protocol, the SO-100 driver and the virtual arm (feetech.py, so100.py, virtual_arm.py).

Packets are checked byte for byte against hand-computed ones; the driver is checked against a scripted peer
that is not the virtual arm (to catch reliance on the simulator's quirks) and against the virtual arm with
every kind of injected fault.
"""

import json
import os
import shlex
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest

import feetech
import so100
from feetech import CONTROL_TABLE, FeetechBus, decode_sign_magnitude, encode_sign_magnitude, parse_status
from so100 import (
    FeetechError, MOTOR_IDS, MOTOR_NAMES, OpenCVCamera, SO100Follower, SO100Leader, load_calibration, open_arm,
    ticks_to_units as normalize, units_to_ticks as unnormalize,
)
from virtual_arm import TRUE_CALIBRATION, VirtualArm

hexbytes = bytes.fromhex
HERE = os.path.dirname(os.path.abspath(__file__))


# -- packets, byte for byte -------------------------------------------------------------------------------------


def test_instruction_packets_are_byte_exact():
    assert feetech.ping_packet(1) == hexbytes("FF FF 01 02 01 FB")
    position = CONTROL_TABLE["Present_Position"]
    assert feetech.read_packet(1, position.address, position.size) == hexbytes("FF FF 01 04 02 38 02 BE")
    assert feetech.sync_read_packet(position.address, position.size, [1, 2, 3, 4, 5, 6]) == \
        hexbytes("FF FF FE 0A 82 38 02 01 02 03 04 05 06 26")
    # WRITE Goal_Position = 2048 to id 1: ~(01+05+03+2A+00+08) = C4
    goal = CONTROL_TABLE["Goal_Position"]
    assert feetech.write_packet(1, goal.address, feetech.encode_value(goal, 2048)) == \
        hexbytes("FF FF 01 05 03 2A 00 08 C4")
    # WRITE Torque_Enable = 1 to id 1: ~(01+04+03+28+01) = CE
    assert feetech.write_packet(1, 40, b"\x01") == hexbytes("FF FF 01 04 03 28 01 CE")
    # SYNC_WRITE Goal_Position {1: 2048, 2: 1024}: len = 2 * 3 + 4 = 0A
    assert feetech.sync_write_packet(42, 2, {1: b"\x00\x08", 2: b"\x00\x04"}) == \
        hexbytes("FF FF FE 0A 83 2A 02 01 00 08 02 00 04 39")


def test_status_packets_parse_with_error_bits():
    ok = parse_status(hexbytes("FF FF 01 04 00 00 08 F2"))  # id 1 answers a 2-byte read: 0x0800
    assert (ok.servo_id, ok.error, feetech.decode_value(CONTROL_TABLE["Present_Position"], ok.data)) == (1, 0, 2048)
    assert feetech.status_packet(1, 0, b"\x00\x08") == hexbytes("FF FF 01 04 00 00 08 F2")
    overload = parse_status(hexbytes("FF FF 01 02 20 DC"))
    assert overload.error == 0x20 and feetech.describe_error_bits(overload.error) == "overload"
    assert feetech.describe_error_bits(0x05) == "input voltage out of range, overheat"
    with pytest.raises(ValueError, match="checksum"):
        parse_status(hexbytes("FF FF 01 02 20 DD"))
    with pytest.raises(ValueError, match="length"):
        parse_status(hexbytes("FF FF 01 03 20 DC"))


def test_sign_magnitude_fields():
    assert encode_sign_magnitude(-5, 11) == 0x805
    assert feetech.encode_value(CONTROL_TABLE["Homing_Offset"], -710) == hexbytes("C6 0A")  # 0x800 | 710
    assert feetech.decode_value(CONTROL_TABLE["Present_Load"], hexbytes("64 04")) == -100  # bit 10 is the sign
    assert feetech.decode_value(CONTROL_TABLE["Present_Position"], hexbytes("01 80")) == -1  # bit 15
    for bit in (10, 11, 15):
        for value in (0, 1, -1, 1000, -1000, (1 << bit) - 1, -((1 << bit) - 1)):
            assert decode_sign_magnitude(encode_sign_magnitude(value, bit), bit) == value
    with pytest.raises(ValueError):
        encode_sign_magnitude(2048, 11)
    with pytest.raises(ValueError):
        feetech.encode_value(CONTROL_TABLE["Lock"], 256)


# -- the driver against a scripted peer (not the virtual arm) ----------------------------------------------------


class ScriptedPeer:
    """The other end of a pty that records each request and answers with given bytes, in pieces."""

    def __init__(self, answers):
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.requests = []
        self.thread = threading.Thread(target=self._run, args=(answers,), daemon=True)
        self.thread.start()

    def _run(self, answers):
        for request_size, pieces in answers:
            request = b""
            while len(request) < request_size:
                request += os.read(self.master, 256)
            self.requests.append(request)
            for piece in pieces:
                os.write(self.master, piece)
                time.sleep(0.003)

    def close(self):
        self.thread.join(timeout=2)
        os.close(self.master)
        os.close(self.slave)


def test_driver_reassembles_split_replies_and_skips_garbage():
    reply = hexbytes("FF FF 01 04 00 00 08 F2")
    peer = ScriptedPeer([(8, [b"\x13\xff", b"\x00\xff\xff\x09", reply[:3], reply[3:5], reply[5:]])])
    with FeetechBus(peer.port, timeout=0.5) as bus:  # generous: a loaded machine may delay the peer thread
        assert bus.read(1, "Present_Position") == 2048
    peer.close()
    assert peer.requests == [hexbytes("FF FF 01 04 02 38 02 BE")]


def test_driver_ignores_an_adapter_echo():
    # An echoing adapter returns "FF FF 01 04 02 38 02 BE" first: it parses as a status packet of servo 1
    # (error 0x02, data 38 02), so the driver must recognise it as its own request.
    request = hexbytes("FF FF 01 04 02 38 02 BE")
    peer = ScriptedPeer([(8, [request, hexbytes("FF FF 01 04 00 00 08 F2")])])
    with FeetechBus(peer.port, timeout=0.5) as bus:
        assert bus.read(1, "Present_Position") == 2048
    peer.close()


def test_sync_read_assigns_by_id_and_asks_again_only_for_the_missing():
    def position(i, value):
        return feetech.status_packet(i, 0, value.to_bytes(2, "little"))

    # Servo 3 answers first, servo 2 stays silent, servo 1 answers last; the retry asks servo 2 alone.
    peer = ScriptedPeer([(11, [position(3, 3000), position(1, 1000)]), (9, [position(2, 2000)])])
    with FeetechBus(peer.port, timeout=0.2) as bus:
        assert bus.sync_read("Present_Position", [1, 2, 3]) == {1: 1000, 2: 2000, 3: 3000}
    peer.close()
    assert peer.requests == [hexbytes("FF FF FE 07 82 38 02 01 02 03 38"), hexbytes("FF FF FE 05 82 38 02 02 3E")]


def test_sync_write_sends_one_packet():
    peer = ScriptedPeer([(14, [])])
    with FeetechBus(peer.port) as bus:
        bus.sync_write("Goal_Position", {1: 2048, 2: 1024})
        time.sleep(0.05)
    peer.close()
    assert peer.requests == [hexbytes("FF FF FE 0A 83 2A 02 01 00 08 02 00 04 39")]


# -- the bus against the virtual arm, with faults ---------------------------------------------------------------


@pytest.fixture
def sim():
    arm = VirtualArm()
    yield arm
    arm.close()


# The virtual arm answers from a thread of this process: on a loaded 2-core machine it can be descheduled for
# longer than a real servo's 50 ms, so the tests give every reply more time (the delay fault stays longer).
TEST_TIMEOUT = 0.3


@pytest.fixture
def bus(sim):
    with FeetechBus(sim.port, timeout=TEST_TIMEOUT, names={i: n for n, i in MOTOR_IDS.items()}) as b:
        yield b


def test_bus_contract(sim, bus):
    assert bus.ping(1) == 777
    assert bus.broadcast_ping() == [1, 2, 3, 4, 5, 6]
    assert bus.read(1, "Homing_Offset") == TRUE_CALIBRATION["shoulder_pan"]["homing_offset"]  # negative
    bus.write(2, "Goal_Position", 1234)
    assert bus.read(2, "Goal_Position") == 1234
    bus.sync_write("Goal_Position", {1: 2100, 3: 1900})
    assert bus.sync_read("Goal_Position", [1, 2, 3]) == {1: 2100, 2: 1234, 3: 1900}
    with pytest.raises(ValueError, match="read-only"):
        bus.write(1, "Present_Position", 0)
    with pytest.raises(ValueError, match="read-only"):
        bus.sync_write("Model_Number", {1: 0})
    with pytest.raises(ValueError, match="broadcast"):
        bus.read(0xFE, "Present_Position")
    with pytest.raises(KeyError, match="Goal_Posiiton"):
        bus.read(1, "Goal_Posiiton")


@pytest.mark.parametrize("kind, params", [
    ("drop", {}), ("corrupt", {}), ("delay", {"seconds": 2 * TEST_TIMEOUT}), ("fragment", {"gap": 0.002}),
    ("garbage", {}), ("garbage", {"data": b"\xff\xff\x02\x04\x00"}),
])
def test_transient_faults_are_retried(sim, bus, kind, params):
    expected = bus.read(2, "Present_Position")
    sim.inject(kind, servo_id=2, **params)
    assert bus.read(2, "Present_Position") == expected
    sim.inject(kind, servo_id=4, **params)
    assert bus.sync_read("Present_Position", [1, 2, 3, 4, 5, 6])[2] == expected
    time.sleep(2 * TEST_TIMEOUT)  # a late reply of the delay fault arrives; the next transaction must not take it
    assert bus.read(2, "Model_Number") == 777


@pytest.mark.parametrize("kind, message", [
    ("drop", "no reply after 4 tries"), ("corrupt", r"corrupt reply \(bad checksum\) after 4 tries"),
])
def test_persistent_faults_name_the_servo(sim, bus, kind, message):
    sim.inject(kind, servo_id=3, times=None)
    with pytest.raises(FeetechError, match=rf"READ Present_Position .*servo 3 \(elbow_flex\): {message}") as e:
        bus.read(3, "Present_Position")
    assert e.value.servo_id == 3


def test_fault_parameters_are_checked(sim):
    with pytest.raises(ValueError, match="missing \\['seconds'\\]"):
        sim.inject("delay", servo_id=1)
    with pytest.raises(ValueError, match="unknown fault"):
        sim.inject("explode")


def test_error_bits_are_reported_not_retried(sim, bus):
    sim.inject("error_bits", servo_id=6, bits=0x20)
    with pytest.raises(FeetechError, match=r"servo 6 \(gripper\): reports overload \(.*power-cycle"):
        bus.read(6, "Present_Position")
    assert bus.read(6, "Model_Number") == 777  # one fault, one error: no retry consumed it


def test_missing_servo_does_not_corrupt_the_others(sim, bus):
    ids = [1, 2, 3, 4, 5, 6]
    sim.move_joint("wrist_flex", 30.0)
    truth = bus.sync_read("Present_Position", ids)
    sim.inject("missing", servo_id=3)
    with pytest.raises(FeetechError, match=r"servo 3 \(elbow_flex\): no reply") as e:
        bus.sync_read("Present_Position", ids)
    assert e.value.servo_id == 3 and list(e.value.failures) == [3]
    assert e.value.partial == {i: v for i, v in truth.items() if i != 3}
    with pytest.raises(FeetechError, match="no reply"):
        bus.ping(3)
    sim.clear_faults()
    assert bus.sync_read("Present_Position", ids) == truth


def test_eeprom_survives_power_cycle_only_when_unlocked(sim, bus):
    bus.write(1, "Lock", 1)
    bus.write(1, "Homing_Offset", 5)
    assert bus.read(1, "Homing_Offset") == 5
    sim.power_cycle()
    assert bus.read(1, "Homing_Offset") == TRUE_CALIBRATION["shoulder_pan"]["homing_offset"]
    bus.write(1, "Lock", 0)
    bus.write(1, "Homing_Offset", 5)
    sim.power_cycle()
    assert bus.read(1, "Homing_Offset") == 5


# -- normalization and calibration files -------------------------------------------------------------------------


def flat_calibration(range_min=1000, range_max=3000):
    return {name: {"id": i + 1, "drive_mode": 0, "homing_offset": 0, "range_min": range_min,
                   "range_max": range_max} for i, name in enumerate(MOTOR_NAMES)}


def test_normalization_formulas():
    cal = flat_calibration(1000, 3000)  # mid 2000, span 2000
    raw = [2500, 1000, 3000, 4000, 0, 1500]
    # degrees: (v - 2000) * 360 / 4095, not clamped; gripper: (1500 - 1000) / 2000 * 100 = 25
    np.testing.assert_allclose(normalize(raw, cal, "degrees"),
                               [500 * 360 / 4095, -1000 * 360 / 4095, 1000 * 360 / 4095, 2000 * 360 / 4095,
                                -2000 * 360 / 4095, 25.0], rtol=1e-6)
    # -100..100 clamps to the range: 4000 -> 100, 0 -> -100
    np.testing.assert_allclose(normalize(raw, cal, "range_m100_100"), [50, -100, 100, 100, -100, 25], rtol=1e-6)
    # inverses truncate: 10° -> 2000 + 113.75 -> 2113; -10° -> 1886.25 -> 1886; gripper 33.3 -> 1666.6 -> 1666
    assert unnormalize([10, -10, 0, 180, -180, 33.33], cal, "degrees") == [2113, 1886, 2000, 4047, -47, 1666]
    assert unnormalize([50, -100, 150, 0, 12.5, 120], cal, "range_m100_100") == \
        [2500, 1000, 3000, 2000, 2125, 3000]
    with pytest.raises(ValueError, match="norm_mode"):
        normalize(raw, cal, "radians")


def test_goal_ticks_match_lerobot():
    # Goal_Position ticks that lerobot 0.4.4's SOFollower.send_action wrote to the virtual arm (calibrated with
    # TRUE_CALIBRATION) for these actions, in its use_degrees=True and use_degrees=False modes.
    assert unnormalize([20, -30, 50, 0, 90, 60], TRUE_CALIBRATION, "degrees") == \
        [2252, 1673, 2543, 2055, 3071, 2912]
    assert unnormalize([10, -20, 30, 0, 40, 60], TRUE_CALIBRATION, "range_m100_100") == \
        [2151, 1776, 2309, 2055, 2866, 2912]


def test_loads_a_lerobot_calibration_file(tmp_path):
    # As lerobot writes it (draccus, indent 4).
    path = tmp_path / "my_arm.json"
    path.write_text(json.dumps(TRUE_CALIBRATION, indent=4))
    assert load_calibration(path) == TRUE_CALIBRATION
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_calibration(tmp_path / "absent.json")
    old_format = {"homing_offset": [0] * 6, "drive_mode": [0] * 6, "motor_names": MOTOR_NAMES}
    with pytest.raises(ValueError, match="no entry for 'shoulder_pan'"):
        load_calibration(old_format)
    wrong_id = json.loads(json.dumps(TRUE_CALIBRATION))
    wrong_id["gripper"]["id"] = 7
    with pytest.raises(ValueError, match="gripper has id 7"):
        load_calibration(wrong_id)


def test_a_missing_calibration_files_hint_calibrates_that_very_file(monkeypatch, tmp_path):
    """The command in the error for a missing calibration file, run as given, calibrates the right arm (follower or
    leader) into that file: an <id>.json in lerobot's directories (--id, --leader), or any other path."""
    made = []
    monkeypatch.setattr(SO100Follower, "connect", lambda arm: arm)  # (no arm on PORT: only where the file goes)
    monkeypatch.setattr(SO100Follower, "calibrate", lambda arm, prompt, wait, save_to: made.append((type(arm), save_to)))
    for arm_class, missing in ((SO100Follower, so100.CALIBRATION_DIR / "no_such_arm.json"),
                               (SO100Leader, so100.LEADER_CALIBRATION_DIR / "no_such_arm.json"),
                               (SO100Follower, tmp_path / "my arms" / "red.json")):
        with pytest.raises(FileNotFoundError, match="run `python so100.py --port PORT ") as error:
            arm_class("PORT", missing)
        so100.main(shlex.split(str(error.value).split("`")[1])[2:])  # (after `python so100.py`)
        assert [(made_by, Path(path)) for made_by, path in made] == [(arm_class, missing)]
        made.clear()


# -- the arm -----------------------------------------------------------------------------------------------------


def servo_register(sim, name, register):
    return sim.servos[MOTOR_IDS[name]].get(register)


def test_connect_configures_and_reads_state(capsys):
    arm, sim = open_arm("sim")
    try:
        out = capsys.readouterr().out
        assert "degrees for the joints, 0..100 for the gripper" in out and "gripper.pos=+50.0" in out
        np.testing.assert_allclose(arm.get_state(), sim.joint_positions_deg(), atol=0.1)
        for name in MOTOR_NAMES:
            assert servo_register(sim, name, "Torque_Enable") == 1
            assert servo_register(sim, name, "P_Coefficient") == 16
            assert servo_register(sim, name, "D_Coefficient") == 32
            assert servo_register(sim, name, "Return_Delay_Time") == 0
            assert servo_register(sim, name, "Acceleration") == 254
        assert servo_register(sim, "gripper", "Max_Torque_Limit") == 500
        assert servo_register(sim, "gripper", "Protection_Current") == 250
        assert servo_register(sim, "gripper", "Overload_Torque") == 25
        assert servo_register(sim, "elbow_flex", "Max_Torque_Limit") == 1000
    finally:
        arm.disconnect()
        sim.close()
    assert all(servo.get("Torque_Enable") == 0 for servo in sim.servos.values())


def test_actions_move_the_arm_and_the_clamp_caps_steps():
    arm, sim = open_arm("sim", verbose=False, speed=4000)
    try:
        target = np.array([20.0, -30.0, 40.0, 10.0, 90.0, 80.0])
        sent = arm.send_action(target)
        np.testing.assert_allclose(sent, target)
        deadline = time.monotonic() + 3
        while np.abs(sim.joint_positions_deg() - target).max() > 0.2 and time.monotonic() < deadline:
            time.sleep(0.02)
        np.testing.assert_allclose(arm.get_state(), target, atol=0.2)
        # A step of at most 5 units from where each joint is.
        arm.max_relative_target = 5.0
        present = arm.get_state()
        sent = arm.send_action(target + [30, -30, 2, 0, -100, -100])
        # joints 2 and 3 are asked to move less than 5 from where they are: they get their targets
        expected = [present[0] + 5, present[1] - 5, 42.0, 10.0, present[4] - 5, present[5] - 5]
        np.testing.assert_allclose(sent, expected, atol=1e-4)
        arm.max_relative_target = dict(zip(MOTOR_NAMES, [1, 2, 3, 4, 5, 6]))
        arm.send_action(arm.get_state())  # stop where it is
        time.sleep(0.1)
        present = arm.get_state()
        sent = arm.send_action(present + 10)
        np.testing.assert_allclose(sent, present + [1, 2, 3, 4, 5, 6], atol=1e-4)
        with pytest.raises(ValueError, match="6 finite numbers"):
            arm.send_action([0, 0, 0, 0, 0, float("nan")])
    finally:
        arm.disconnect()
        sim.close()


def test_scripted_calibration_recovers_the_true_one(tmp_path):
    with VirtualArm(calibrated=False) as sim:
        arm = SO100Follower(sim.port, calibration=None, verbose=False)
        arm.connect()
        with pytest.raises(RuntimeError, match="no calibration"):
            arm.get_state()
        prompt, wait = sim.calibration_hand()
        calibration = arm.calibrate(prompt=prompt, wait=wait, save_to=tmp_path / "arm.json")
        assert calibration == TRUE_CALIBRATION
        assert json.loads((tmp_path / "arm.json").read_text()) == TRUE_CALIBRATION
        np.testing.assert_allclose(arm.get_state(), sim.joint_positions_deg(), atol=0.1)
        arm.disconnect()
        # Written with the Lock dance: the servos keep it across a power cycle, and a new session finds it.
        sim.power_cycle()
        for name, entry in TRUE_CALIBRATION.items():
            assert servo_register(sim, name, "Homing_Offset") == entry["homing_offset"]
            assert servo_register(sim, name, "Min_Position_Limit") == entry["range_min"]
            assert servo_register(sim, name, "Max_Position_Limit") == entry["range_max"]
        with SO100Follower(sim.port, calibration=tmp_path / "arm.json", verbose=False) as again:
            np.testing.assert_allclose(again.get_state(), sim.joint_positions_deg(), atol=0.1)


def test_connect_writes_the_file_calibration_and_clears_multi_turn(sim):
    sim.servos[4].set("Phase", 0x1C)
    sim.servos[2].set("Homing_Offset", 0)
    with SO100Follower(sim.port, calibration=TRUE_CALIBRATION, verbose=False) as arm:
        assert sim.servos[4].get("Phase") == 0x0C
        assert sim.servos[2].get("Homing_Offset") == TRUE_CALIBRATION["shoulder_lift"]["homing_offset"]
        np.testing.assert_allclose(arm.get_state(), sim.joint_positions_deg(), atol=0.1)


def test_connect_checks_model_numbers(sim):
    sim.servos[5].regs[3:5] = (2825).to_bytes(2, "little")  # an STS3250
    arm = SO100Follower(sim.port, calibration=TRUE_CALIBRATION, verbose=False)
    with pytest.raises(FeetechError, match=r"wrist_roll \(id 5\) .* model 2825"):
        arm.connect()
    assert arm.bus is None


@pytest.mark.parametrize("exception", [ZeroDivisionError, KeyboardInterrupt])  # a bug, or Ctrl-C
def test_torque_off_after_an_exception(sim, exception):
    with pytest.raises(exception):
        with SO100Follower(sim.port, calibration=TRUE_CALIBRATION, verbose=False) as arm:
            arm.send_action(arm.get_state())
            assert all(servo.get("Torque_Enable") == 1 for servo in sim.servos.values())
            raise exception()
    assert all(servo.get("Torque_Enable") == 0 for servo in sim.servos.values())


def test_torque_off_on_the_others_when_a_servo_disappears(sim, capsys):
    with pytest.raises(FeetechError, match="servo 3"):
        with SO100Follower(sim.port, calibration=TRUE_CALIBRATION, verbose=False) as arm:
            sim.inject("missing", servo_id=3)
            arm.get_state()
    assert [servo.get("Torque_Enable") for servo in sim.servos.values()] == [0, 0, 1, 0, 0, 0]
    assert "could not switch torque off" in capsys.readouterr().err


def test_cli_on_the_virtual_arm(tmp_path, capsys):
    so100.main(["--port", "sim", "--calibration", str(tmp_path / "cal.json"), "calibrate"])
    assert json.loads((tmp_path / "cal.json").read_text()) == TRUE_CALIBRATION
    so100.main(["--port", "sim", "move", "10", "0", "0", "0", "0", "50", "--max-step", "5"])
    assert "shoulder_pan.pos=+9.9" in capsys.readouterr().out.splitlines()[-1]


def test_opencv_camera_reads_rgb(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = str(tmp_path / "red.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(np.full((48, 64, 3), (0, 0, 255), np.uint8))  # BGR red
    writer.release()
    camera = OpenCVCamera(path, width=64, height=48)
    frame = camera.read()
    camera.close()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    assert frame[..., 0].mean() > 200 and frame[..., 2].mean() < 50  # red comes out in channel 0
    with pytest.raises(ValueError, match="delivers 64x48"):
        OpenCVCamera(path, width=640, height=480)


# -- the virtual arm never touches a real arm's calibration ------------------------------------------------------


def test_sim_calibration_never_reaches_a_real_arms_file(tmp_path):
    """`--port sim calibrate` in a fresh home directory: the real arm's <id>.json stays as it was, nothing is
    written under the calibration directory, and the hint names `sim`, not the virtual arm's pty."""
    real = tmp_path / ".cache" / "huggingface" / "lerobot" / "calibration" / "robots" / "so_follower" / "my_so100.json"
    real.parent.mkdir(parents=True)
    real_calibration = {name: {**entry, "homing_offset": entry["homing_offset"] + 7} for name, entry in TRUE_CALIBRATION.items()}
    real.write_text(json.dumps(real_calibration))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_LEROBOT")} | {"HOME": str(tmp_path)}
    for extra in ([], ["--id", "my_so100"], ["--id", "other"]):
        result = subprocess.run([sys.executable, os.path.join(HERE, "so100.py"), "--port", "sim", *extra, "calibrate"],
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "--port sim calibrate" in result.stdout and "/dev/pts" not in result.stdout.split("NOT calibrated")[1][:80]
        assert json.loads(real.read_text()) == real_calibration
        assert sorted(p.name for p in real.parent.iterdir()) == ["my_so100.json"]


def test_connect_refuses_a_calibration_made_on_another_arm(sim):
    """Servos whose encoders, read through the file's offsets, fall outside its ranges are not overwritten."""
    other = {name: dict(entry) for name, entry in TRUE_CALIBRATION.items()}
    other["shoulder_pan"]["homing_offset"] += 2000
    other["elbow_flex"]["homing_offset"] -= 1500
    arm = SO100Follower(sim.port, calibration=other, verbose=False)
    with pytest.raises(ValueError, match=r"shoulder_pan \d+, elbow_flex \d+ .* another arm.*so100.py --port .* calibrate"):
        arm.connect()
    assert arm.bus is None and all(servo.get("Torque_Enable") == 0 for servo in sim.servos.values())
    for name, entry in TRUE_CALIBRATION.items():  # untouched
        assert servo_register(sim, name, "Homing_Offset") == entry["homing_offset"]
    # a calibration that fits (the same arm, re-centred by a few ticks) is still written
    close = {name: {**entry, "homing_offset": entry["homing_offset"] + 20} for name, entry in TRUE_CALIBRATION.items()}
    with SO100Follower(sim.port, calibration=close, verbose=False):
        assert servo_register(sim, "shoulder_pan", "Homing_Offset") == TRUE_CALIBRATION["shoulder_pan"]["homing_offset"] + 20


@pytest.mark.parametrize("argv", [["read", "--hz", "0"], ["read", "--seconds", "-1"], ["move", "0", "0", "0", "0", "0", "50", "--hz", "-2"]])
def test_cli_bad_rates_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        so100.main(["--port", "sim", *argv])
    assert exit_info.value.code == 2 and "error: --hz must be positive" in capsys.readouterr().err


# -- servo setup and the leader arm ------------------------------------------------------------------------------


def test_id_and_baud_rate_writes_are_byte_exact(monkeypatch):
    sent = []
    monkeypatch.setattr(FeetechBus, "_transact", lambda bus, servo_id, packet, size, what: sent.append(packet))
    monkeypatch.setattr(FeetechBus, "__init__", lambda bus, *args, **options: setattr(bus, "_serial", None))
    monkeypatch.setattr(FeetechBus, "close", lambda bus: None)
    monkeypatch.setattr(feetech, "find_single_servo", lambda port, timeout: (115_200, 1, 777))
    monkeypatch.setattr(FeetechBus, "read", lambda bus, servo_id, name: {"ID": 6, "Baud_Rate": 0}[name])
    assert feetech.set_id_and_baud("port", 6) == (115_200, 1, 777)
    assert sent == [hexbytes("FF FF 01 04 03 28 00 CF"),  # Torque_Enable (40) of servo 1 := 0
                    hexbytes("FF FF 01 04 03 37 00 C0"),  # Lock (55) := 0: EEPROM writes are kept
                    hexbytes("FF FF 01 04 03 05 06 EC"),  # ID (5) := 6, acknowledged under id 1
                    hexbytes("FF FF 06 04 03 06 00 EC"),  # Baud_Rate (6) of servo 6 := 0 (1 Mbaud)
                    hexbytes("FF FF 06 04 03 37 01 BA")]  # at 1 Mbaud: Lock := 1, answered at the new id


def test_setup_gives_new_servos_ids_one_to_six_at_one_megabaud(monkeypatch, capsys):
    arms, close = [], VirtualArm.close
    monkeypatch.setattr(so100, "VirtualArm", lambda **options: arms.append(VirtualArm(**options)) or arms[-1])
    monkeypatch.setattr(VirtualArm, "close", lambda sim: None)  # kept open to look at it afterwards
    so100.main(["--port", "sim", "setup-motors"])  # the virtual arm's six servos all answer as id 1 at 115200
    sim, = arms
    try:
        sim.plugged_in = set(sim.servos)  # the whole arm wired back together
        sim.power_cycle()  # written through the EEPROM lock: kept at power-off
        with FeetechBus(sim.port, timeout=TEST_TIMEOUT) as bus:
            assert bus.broadcast_ping() == [1, 2, 3, 4, 5, 6]
            assert all(bus.read(i, "Baud_Rate") == 0 and bus.read(i, "Lock") == 1 for i in range(1, 7))
        # each servo got the id of its joint, the gripper first
        assert {slot: servo.get("ID") for slot, servo in sim.servos.items()} == {i: i for i in range(1, 7)}
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 6 and lines[0] == "gripper: id 1 at 115200 baud -> id 6 at 1000000 baud"
        assert lines[-1] == "shoulder_pan: id 1 at 115200 baud -> id 1 at 1000000 baud"
    finally:
        close(sim)


def test_a_servo_is_found_at_its_own_baud_rate_also_the_custom_ones():
    """250000 and 128000 have no termios constant (a custom rate on Linux): each is told apart all the same."""
    sim = VirtualArm(factory_new=True)
    try:
        sim.plugged_in = {6}
        for rate in (250_000, 128_000, 1_000_000):
            sim.servos[6].set("Baud_Rate", feetech.BAUD_RATES[rate])
            assert feetech.find_single_servo(sim.port, timeout=0.1)[:2] == (rate, 1)
    finally:
        sim.close()


def test_setup_refuses_two_servos_at_once_and_says_when_none_answers():
    sim = VirtualArm(factory_new=True)
    try:
        sim.plugged_in = {6}
        feetech.set_id_and_baud(sim.port, 6, timeout=0.1)
        sim.plugged_in = {6, 5}  # the gripper, set up, is still connected: it must not be renamed
        with pytest.raises(FeetechError, match=r"2 servos answer .*\(id 6 at 1000000 baud, id 1 at 115200 baud\)"):
            feetech.set_id_and_baud(sim.port, 5, timeout=0.1)
        assert sim.servos[6].get("ID") == 6 and sim.servos[5].get("ID") == 1
        sim.plugged_in = set()
        with pytest.raises(FeetechError, match="0 servos answer .*connect exactly one servo"):
            feetech.find_single_servo(sim.port, timeout=0.1)
    finally:
        sim.close()


def test_leader_arm_is_read_with_torque_off_and_calibrates_to_its_own_file(tmp_path, monkeypatch):
    monkeypatch.setattr(so100.SO100Leader, "calibration_dir", tmp_path / "teleoperators" / "so_leader")
    leader, sim = open_arm("sim", leader=True, verbose=False)
    try:
        assert all(servo.get("Torque_Enable") == 0 for servo in sim.servos.values())
        sim.move_joint("elbow_flex", 30.0)  # a person moves it
        np.testing.assert_allclose(leader.get_state(), sim.joint_positions_deg(), atol=0.1)
        with pytest.raises(RuntimeError, match="moved by hand"):
            leader.send_action(np.zeros(6))
    finally:
        leader.disconnect()
        sim.close()
    # a real leader's calibration goes to lerobot's layout for leader arms; the virtual one's only where told
    assert so100.default_calibration(None, "blue", directory=so100.SO100Leader.calibration_dir) == (
        tmp_path / "teleoperators" / "so_leader" / "blue.json")
    so100.main(["--port", "sim", "--leader", "--calibration", str(tmp_path / "blue.json"), "calibrate"])
    assert json.loads((tmp_path / "blue.json").read_text()) == TRUE_CALIBRATION
    assert not (tmp_path / "teleoperators").exists()
    assert so100.LEADER_CALIBRATION_DIR.parts[-2:] == ("teleoperators", "so_leader")


def test_sim_calibration_is_refused_a_path_among_real_arms_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(so100, "CALIBRATION_DIR", tmp_path / "robots" / "so_follower")
    for real_file in (tmp_path / "robots" / "so_follower" / "my_so100.json", so100.LEADER_CALIBRATION_DIR / "x.json"):
        with pytest.raises(SystemExit) as exit_info:
            so100.main(["--port", "sim", "--calibration", str(real_file), "calibrate"])
        assert exit_info.value.code == 2 and "never goes where real arms' files are" in capsys.readouterr().err
        assert not real_file.exists()


# -- every system a classroom brings: no pseudo-terminal (Windows), COM port names ------------------------------


def run_without_pty(script, *args):
    """`python script args...` in a Python whose os module has no openpty (as on Windows)."""
    code = ("import os, runpy, sys; del os.openpty; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, os.path.join(HERE, script), *args], capture_output=True,
                          text=True, timeout=120, cwd=HERE)


@pytest.mark.parametrize("command", [["so100.py", "--port", "sim", "read"],
                                     ["record.py", "--port", "sim", "--leader-port", "sim", "--teleoperate"]])
def test_sim_port_without_a_pseudo_terminal_is_one_line_saying_what_works(command):
    result = run_without_pty(*command)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"error: {__import__('virtual_arm').NO_PTY}"]
    assert "WSL" in result.stderr and "COM3" in result.stderr


def test_a_windows_port_name_goes_to_pyserial_unchanged():
    """COM3 is pyserial's business: on this Linux machine pyserial cannot open it, and the one line says
    which ports it does see."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "so100.py"), "--port", "COM3", "scan"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("error: cannot open serial port 'COM3' (") and "serial ports found: " in lines[0]


def test_enter_is_read_from_the_windows_console(monkeypatch):
    """so100's calibration waits for ENTER with select() on POSIX; on Windows (msvcrt, faked here) it polls
    the console's keys."""
    keys = iter("x\r")
    fake = type(sys)("msvcrt")
    fake.kbhit = lambda: True
    fake.getwch = lambda: next(keys)
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(sys, "platform", "win32")
    assert so100._enter_pressed(1.0)  # 'x' ignored, then ENTER
    fake.kbhit = lambda: False
    start = time.monotonic()
    assert not so100._enter_pressed(0.1) and time.monotonic() - start >= 0.1
