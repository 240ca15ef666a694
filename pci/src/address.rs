//! PCI addresses (`domain:bus:device.function`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A PCI function address in the kernel's sysfs spelling, `0000:17:00.0`.
///
/// Ordering is numeric (domain, bus, device, function), which is also the
/// order in which group locks are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    domain: u16,
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// The highest device (slot) number on a bus.
    pub const MAX_DEVICE: u8 = 31;
    /// The highest function number in a slot.
    pub const MAX_FUNCTION: u8 = 7;

    /// Builds an address, checking that device ≤ 31 and function ≤ 7.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Result<Self> {
        if device > Self::MAX_DEVICE || function > Self::MAX_FUNCTION {
            return Err(Error::InvalidAddress {
                input: format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}"),
                reason: "the device number must be at most 0x1f and the function at most 7",
            });
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// Parses `DDDD:BB:dd.f`, or the short `BB:dd.f` (domain 0) that `lspci` prints.
    pub fn parse(input: &str) -> Result<Self> {
        let invalid = |reason: &'static str| Error::InvalidAddress {
            input: input.to_owned(),
            reason,
        };
        let (head, function) = input
            .rsplit_once('.')
            .ok_or_else(|| invalid("it has no `.function` part"))?;
        let mut parts = head.split(':');
        let fields: Vec<&str> = parts.by_ref().take(4).collect();
        let (domain, bus, device) = match fields.as_slice() {
            [domain, bus, device] => (Some(*domain), *bus, *device),
            [bus, device] => (None, *bus, *device),
            _ => return Err(invalid("expected `domain:bus:device.function`")),
        };
        let hex = |text: &str, width: usize, what: &'static str| -> Result<u32> {
            if text.is_empty() || text.len() > width || !text.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(invalid(what));
            }
            u32::from_str_radix(text, 16).map_err(|_| invalid(what))
        };
        let domain = match domain {
            Some(text) => hex(text, 4, "the domain must be 1 to 4 hex digits")?,
            None => 0,
        };
        let bus = hex(bus, 2, "the bus must be 1 or 2 hex digits")?;
        let device = hex(device, 2, "the device must be 1 or 2 hex digits")?;
        let function = hex(function, 1, "the function must be one digit, 0 to 7")?;
        if device > u32::from(Self::MAX_DEVICE) {
            return Err(invalid("the device number must be at most 0x1f"));
        }
        if function > u32::from(Self::MAX_FUNCTION) {
            return Err(invalid("the function must be 0 to 7"));
        }
        // The widths were checked above, so these conversions cannot truncate.
        Ok(Self {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }

    /// The PCI domain (segment).
    pub fn domain(&self) -> u16 {
        self.domain
    }

    /// The bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// The device (slot) number, 0 to 31.
    pub fn device(&self) -> u8 {
        self.device
    }

    /// The function number, 0 to 7.
    pub fn function(&self) -> u8 {
        self.function
    }

    /// Whether `other` is another function of the same slot (same domain, bus and device).
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let full = PciAddress::parse("0000:17:00.0").unwrap();
        assert_eq!(full, PciAddress::new(0, 0x17, 0, 0).unwrap());
        assert_eq!(full.to_string(), "0000:17:00.0");

        let short = PciAddress::parse("c3:1f.7").unwrap();
        assert_eq!(short.to_string(), "0000:c3:1f.7");

        let upper = PciAddress::parse("000A:Db:1E.3").unwrap();
        assert_eq!(upper.to_string(), "000a:db:1e.3");
        assert_eq!(upper.domain(), 0xa);
        assert_eq!(upper.bus(), 0xdb);
        assert_eq!(upper.device(), 0x1e);
        assert_eq!(upper.function(), 3);
    }

    #[test]
    fn rejects_malformed_addresses_with_a_reason() {
        let cases = [
            ("", "no `.function`"),
            ("0000:17:00", "no `.function`"),
            ("0000:17:20.0", "at most 0x1f"),
            ("0000:17:00.8", "0 to 7"),
            ("0000:117:00.0", "bus must be"),
            ("00000:17:00.0", "domain must be"),
            ("0000:1g:00.0", "bus must be"),
            ("0000:17:00.", "function must be"),
            ("0:0:0:17:00.0", "expected `domain:bus:device.function`"),
            ("17.0", "expected `domain:bus:device.function`"),
            ("+000:17:00.0", "domain must be"),
        ];
        for (input, reason) in cases {
            let err = PciAddress::parse(input).unwrap_err().to_string();
            assert!(err.contains(reason), "{input:?}: {err}");
            assert!(err.contains(&format!("`{input}`")), "{input:?}: {err}");
        }
        assert!(PciAddress::new(0, 0, 32, 0).is_err());
        assert!(PciAddress::new(0, 0, 0, 8).is_err());
    }

    #[test]
    fn orders_numerically_and_round_trips_through_serde() {
        let mut addresses: Vec<PciAddress> = [
            "0000:c3:00.0",
            "0000:1b:00.1",
            "0001:00:00.0",
            "0000:1b:00.0",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        addresses.sort();
        let sorted: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        assert_eq!(
            sorted,
            [
                "0000:1b:00.0",
                "0000:1b:00.1",
                "0000:c3:00.0",
                "0001:00:00.0"
            ]
        );

        let json = serde_json::to_string(&addresses[0]).unwrap();
        assert_eq!(json, "\"0000:1b:00.0\"");
        let back: PciAddress = serde_json::from_str(&json).unwrap();
        assert_eq!(back, addresses[0]);
        assert!(serde_json::from_str::<PciAddress>("\"nonsense\"").is_err());
    }

    #[test]
    fn same_slot_ignores_only_the_function() {
        let gpu = PciAddress::parse("0000:01:00.0").unwrap();
        assert!(gpu.same_slot(&PciAddress::parse("0000:01:00.1").unwrap()));
        assert!(!gpu.same_slot(&PciAddress::parse("0000:01:01.0").unwrap()));
        assert!(!gpu.same_slot(&PciAddress::parse("0001:01:00.1").unwrap()));
    }
}
