#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A generated sysfs tree of sensors for the sensors plugin (its SysfsRoot=
setting), laid out as the kernel does: class/hwmon/hwmonN, class/thermal/
thermal_zoneN, bus/iio/devices/iio:deviceN, bus/w1/devices/FF-ID. Some files
are malformed on purpose.

As a module: build(root) writes the tree and returns SENSORS, the variables
the plugin should derive from it (value, unit; or the error it should
report). As a command: sysfs_tree.py ROOT (tools/dev uses it).
"""

import os
import sys

# (path relative to root, content)
FILES = [
    ("class/hwmon/hwmon0/name", "coretemp\n"),
    ("class/hwmon/hwmon0/temp1_input", "42500\n"),
    ("class/hwmon/hwmon0/temp1_label", "Package id 0\n"),
    ("class/hwmon/hwmon0/temp2_input", "43000\n"),
    ("class/hwmon/hwmon0/temp1_max", "100000\n"),
    ("class/hwmon/hwmon1/name", "sht3x\n"),
    ("class/hwmon/hwmon1/temp1_input", "21000\n"),
    ("class/hwmon/hwmon1/humidity1_input", "45500\n"),
    ("class/hwmon/hwmon2/name", "ina219\n"),
    ("class/hwmon/hwmon2/in0_input", "5012\n"),
    ("class/hwmon/hwmon2/curr1_input", "250\n"),
    ("class/hwmon/hwmon2/power1_input", "1253000\n"),
    ("class/hwmon/hwmon3/name", "pwmfan\n"),
    ("class/hwmon/hwmon3/fan1_input", "1200\n"),
    ("class/hwmon/hwmon3/pwm1", "128\n"),
    # A second chip of the same name gets a suffix.
    ("class/hwmon/hwmon4/name", "coretemp\n"),
    ("class/hwmon/hwmon4/temp1_input", "50000\n"),
    # Old-style driver: attributes under device/.
    ("class/hwmon/hwmon5/device/name", "lm75\n"),
    ("class/hwmon/hwmon5/device/temp1_input", "30000\n"),
    # Malformed.
    ("class/hwmon/hwmon6/name", "broken\n"),
    ("class/hwmon/hwmon6/temp1_input", "not a number\n"),
    ("class/thermal/thermal_zone0/type", "cpu-thermal\n"),
    ("class/thermal/thermal_zone0/temp", "47000\n"),
    ("class/thermal/thermal_zone1/type", "x86_pkg_temp\n"),
    ("class/thermal/thermal_zone1/temp", ""),  # empty: malformed
    ("class/thermal/cooling_device0/type", "Processor\n"),
    ("bus/iio/devices/iio:device0/name", "bme280\n"),
    ("bus/iio/devices/iio:device0/in_temp_input", "21340\n"),
    ("bus/iio/devices/iio:device0/in_humidityrelative_input", "45123\n"),
    ("bus/iio/devices/iio:device0/in_pressure_input", "101.325\n"),
    ("bus/iio/devices/iio:device0/in_temp_oversampling_ratio", "2\n"),
    ("bus/iio/devices/iio:device1/name", "bh1750\n"),
    ("bus/iio/devices/iio:device1/in_illuminance_raw", "1000\n"),
    ("bus/iio/devices/iio:device1/in_illuminance_scale", "0.5\n"),
    ("bus/iio/devices/iio:device2/name", "tmp117\n"),
    ("bus/iio/devices/iio:device2/in_temp_raw", "2800\n"),
    ("bus/iio/devices/iio:device2/in_temp_offset", "0\n"),
    ("bus/iio/devices/iio:device2/in_temp_scale", "7.8125\n"),
    # Processed and raw for one channel: the processed value wins.
    ("bus/iio/devices/iio:device3/name", "si7020\n"),
    ("bus/iio/devices/iio:device3/in_humidityrelative_raw", "999999\n"),
    ("bus/iio/devices/iio:device3/in_humidityrelative_input", "38000\n"),
    ("bus/w1/devices/28-0316a279b9ff/temperature", "23125\n"),
    ("bus/w1/devices/28-00000abcdef0/w1_slave",
     "38 01 4b 46 7f ff 0c 10 5b : crc=5b YES\n38 01 4b 46 7f ff 0c 10 5b t=19500\n"),
    ("bus/w1/devices/28-00000bad0000/w1_slave",
     "38 01 4b 46 7f ff 0c 10 5b : crc=00 NO\n38 01 4b 46 7f ff 0c 10 5b t=85000\n"),
    ("bus/w1/devices/w1_bus_master1/w1_master_slave_count", "3\n"),
    ("bus/w1/devices/3a-000000123456/state", "\x00"),  # a switch, not a sensor
]

# variable -> (value, unit) or ("error", text the API error contains)
SENSORS = {
    "hwmon.coretemp.temp1": (42.5, "°C"),
    "hwmon.coretemp.temp2": (43.0, "°C"),
    "hwmon.sht3x.temp1": (21.0, "°C"),
    "hwmon.sht3x.humidity1": (45.5, "%"),
    "hwmon.ina219.in0": (5.012, "V"),
    "hwmon.ina219.curr1": (0.25, "A"),
    "hwmon.ina219.power1": (1.253, "W"),
    "hwmon.pwmfan.fan1": (1200, "rpm"),
    "hwmon.coretemp_1.temp1": (50.0, "°C"),
    "hwmon.lm75.temp1": (30.0, "°C"),
    "hwmon.broken.temp1": ("error", "Bad message"),
    "thermal.cpu-thermal": (47.0, "°C"),
    "thermal.x86_pkg_temp": ("error", "Bad message"),
    "iio.bme280.temp": (21.34, "°C"),
    "iio.bme280.humidityrelative": (45.123, "%"),
    "iio.bme280.pressure": (101325.0, "Pa"),
    "iio.bh1750.illuminance": (500.0, "lx"),
    "iio.tmp117.temp": (21.875, "°C"),
    "iio.si7020.humidityrelative": (38.0, "%"),
    "w1.28-0316a279b9ff": (23.125, "°C"),
    "w1.28-00000abcdef0": (19.5, "°C"),
    "w1.28-00000bad0000": ("error", "Input/output error"),
}

UNITS = {name: v[1] for name, v in SENSORS.items() if v[0] != "error"}


def write(root, rel, content):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write then rename, so a sampler never sees a half-written value.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.rename(tmp, path)


def build(root):
    for rel, content in FILES:
        write(root, rel, content)
    return SENSORS


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    build(sys.argv[1])
