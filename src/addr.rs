//! Logical addresses: `cluster.type.server` packed into 32 bits.
//!
//! The layout is the seed's 12/8/12 split: cluster in the high 12 bits (1..=4095), node type in
//! the middle 8 bits (1..=254 for ordinary nodes, 255 for harbors) and server in the low 12 bits
//! (0..=4095). Harbor addresses can only be built with [`LogicAddr::harbor`], so an ordinary
//! constructor can never produce one by accident.

use std::fmt;
use std::str::FromStr;

/// Node type reserved for harbors, the nodes that carry traffic between clusters.
pub const HARBOR_TYPE: u8 = 255;

const CLUSTER_SHIFT: u32 = 20;
const TYPE_SHIFT: u32 = 12;
const SERVER_MASK: u32 = 0xFFF;
const TYPE_MASK: u32 = 0xFF;

/// Largest cluster number.
pub const MAX_CLUSTER: u16 = 4095;
/// Largest server number.
pub const MAX_SERVER: u16 = 4095;
/// Largest type of an ordinary (non-harbor) node.
pub const MAX_TYPE: u8 = 254;

/// The 32-bit logical address of a node: `cluster.type.server`.
///
/// ```
/// use clustergo::LogicAddr;
/// let a: LogicAddr = "1.2.3".parse().unwrap();
/// assert_eq!((a.cluster(), a.node_type(), a.server()), (1, 2, 3));
/// assert_eq!(a.to_string(), "1.2.3");
/// assert!("0.1.1".parse::<LogicAddr>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogicAddr(u32);

/// Which part of a logical address was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrField {
    /// The cluster number.
    Cluster,
    /// The node type.
    Type,
    /// The server number.
    Server,
}

impl fmt::Display for AddrField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrField::Cluster => "cluster",
            AddrField::Type => "type",
            AddrField::Server => "server",
        })
    }
}

/// A logical address that could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    /// The text is not three dot-separated numbers.
    #[error("invalid logical address {text:?}: expected cluster.type.server, e.g. 1.2.1")]
    Format {
        /// The text as given.
        text: String,
    },
    /// One field is not a decimal number.
    #[error("invalid logical address {text:?}: {field} {value:?} is not a decimal number")]
    NotANumber {
        /// The text as given.
        text: String,
        /// The field at fault.
        field: AddrField,
        /// The field's text.
        value: String,
    },
    /// One field is out of its range.
    #[error("invalid logical address: {field} {value} is out of range {min}..={max}")]
    OutOfRange {
        /// The field at fault.
        field: AddrField,
        /// The value given.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// Type 255 was given to an ordinary constructor, or another type to the harbor one.
    #[error("invalid logical address: type 255 is reserved for harbors; use LogicAddr::harbor")]
    HarborType,
    /// A raw `u32` whose type field is 0 or whose cluster field is 0.
    #[error("invalid logical address value {0:#010x}: cluster and type must not be 0")]
    Raw(u32),
}

fn check(field: AddrField, value: u64, min: u64, max: u64) -> Result<(), AddrError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(AddrError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

impl LogicAddr {
    /// Builds the address of an ordinary node. `node_type` must be 1..=254.
    pub fn new(cluster: u16, node_type: u8, server: u16) -> Result<Self, AddrError> {
        if node_type == HARBOR_TYPE {
            return Err(AddrError::HarborType);
        }
        check(AddrField::Cluster, cluster.into(), 1, MAX_CLUSTER.into())?;
        check(AddrField::Type, node_type.into(), 1, MAX_TYPE.into())?;
        check(AddrField::Server, server.into(), 0, MAX_SERVER.into())?;
        Ok(Self::pack(cluster, node_type, server))
    }

    /// Builds the address of a harbor (type 255) of `cluster`.
    pub fn harbor(cluster: u16, server: u16) -> Result<Self, AddrError> {
        check(AddrField::Cluster, cluster.into(), 1, MAX_CLUSTER.into())?;
        check(AddrField::Server, server.into(), 0, MAX_SERVER.into())?;
        Ok(Self::pack(cluster, HARBOR_TYPE, server))
    }

    fn pack(cluster: u16, node_type: u8, server: u16) -> Self {
        LogicAddr(
            (u32::from(cluster) << CLUSTER_SHIFT)
                | (u32::from(node_type) << TYPE_SHIFT)
                | u32::from(server),
        )
    }

    /// Interprets a raw value, e.g. one read off the wire. Rejects cluster 0 and type 0.
    pub fn from_u32(raw: u32) -> Result<Self, AddrError> {
        let a = LogicAddr(raw);
        if a.cluster() == 0 || a.node_type() == 0 {
            return Err(AddrError::Raw(raw));
        }
        Ok(a)
    }

    /// The packed 32-bit value.
    pub fn as_u32(self) -> u32 {
        self.0
    }

    /// The cluster number.
    pub fn cluster(self) -> u16 {
        (self.0 >> CLUSTER_SHIFT) as u16
    }

    /// The node type; 255 for a harbor.
    pub fn node_type(self) -> u8 {
        ((self.0 >> TYPE_SHIFT) & TYPE_MASK) as u8
    }

    /// The server number.
    pub fn server(self) -> u16 {
        (self.0 & SERVER_MASK) as u16
    }

    /// Whether this is a harbor's address.
    pub fn is_harbor(self) -> bool {
        self.node_type() == HARBOR_TYPE
    }
}

impl fmt::Display for LogicAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.cluster(),
            self.node_type(),
            self.server()
        )
    }
}

impl fmt::Debug for LogicAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogicAddr({self})")
    }
}

impl FromStr for LogicAddr {
    type Err = AddrError;

    /// Parses `cluster.type.server`. Each field is plain decimal digits (no sign, no spaces).
    /// `c.255.s` parses to a harbor address, as harbors appear in membership like any node.
    fn from_str(text: &str) -> Result<Self, AddrError> {
        let mut parts = text.split('.');
        let (Some(c), Some(t), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AddrError::Format { text: text.into() });
        };
        let num = |field, value: &str| -> Result<u64, AddrError> {
            let bad = || AddrError::NotANumber {
                text: text.into(),
                field,
                value: value.into(),
            };
            if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            value.parse().map_err(|_| bad())
        };
        let c = num(AddrField::Cluster, c)?;
        let t = num(AddrField::Type, t)?;
        let s = num(AddrField::Server, s)?;
        check(AddrField::Cluster, c, 1, MAX_CLUSTER.into())?;
        check(AddrField::Type, t, 1, HARBOR_TYPE.into())?;
        check(AddrField::Server, s, 0, MAX_SERVER.into())?;
        // The checks above bound every value to its field's width.
        Ok(Self::pack(c as u16, t as u8, s as u16))
    }
}

impl serde::Serialize for LogicAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for LogicAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_12_8_12() {
        let a = LogicAddr::new(1, 2, 3).unwrap();
        assert_eq!(a.as_u32(), (1 << 20) | (2 << 12) | 3);
        let max = LogicAddr::new(4095, 254, 4095).unwrap();
        assert_eq!(max.to_string(), "4095.254.4095");
        assert_eq!(LogicAddr::from_u32(max.as_u32()).unwrap(), max);
    }

    #[test]
    fn harbor_only_through_its_constructor() {
        assert_eq!(LogicAddr::new(1, 255, 1), Err(AddrError::HarborType));
        let h = LogicAddr::harbor(7, 1).unwrap();
        assert!(h.is_harbor());
        assert_eq!(h.to_string(), "7.255.1");
        assert_eq!("7.255.1".parse::<LogicAddr>().unwrap(), h);
    }

    #[test]
    fn errors_name_the_field_and_range() {
        let e = "0.1.1".parse::<LogicAddr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid logical address: cluster 0 is out of range 1..=4095"
        );
        let e = "1.0.1".parse::<LogicAddr>().unwrap_err();
        assert!(
            e.to_string().contains("type 0 is out of range 1..=255"),
            "{e}"
        );
        let e = "1.1.4096".parse::<LogicAddr>().unwrap_err();
        assert!(e.to_string().contains("server 4096"), "{e}");
        let e = "1.x.1".parse::<LogicAddr>().unwrap_err();
        assert!(matches!(
            e,
            AddrError::NotANumber {
                field: AddrField::Type,
                ..
            }
        ));
        assert!(matches!(
            "1.2".parse::<LogicAddr>(),
            Err(AddrError::Format { .. })
        ));
        assert!(matches!(LogicAddr::from_u32(0), Err(AddrError::Raw(0))));
    }

    proptest! {
        #[test]
        fn round_trip(c in 1u16..=4095, t in 1u8..=254, s in 0u16..=4095) {
            let a = LogicAddr::new(c, t, s).unwrap();
            let text = a.to_string();
            prop_assert_eq!(text.parse::<LogicAddr>().unwrap(), a);
            prop_assert_eq!(LogicAddr::from_u32(a.as_u32()).unwrap(), a);
            prop_assert_eq!((a.cluster(), a.node_type(), a.server()), (c, t, s));
        }

        #[test]
        fn harbor_round_trip(c in 1u16..=4095, s in 0u16..=4095) {
            let a = LogicAddr::harbor(c, s).unwrap();
            prop_assert_eq!(a.to_string().parse::<LogicAddr>().unwrap(), a);
        }

        #[test]
        fn out_of_range_rejected(c in 0u64..100_000, t in 0u64..1000, s in 0u64..100_000) {
            let text = format!("{c}.{t}.{s}");
            let ok = (1..=4095).contains(&c) && (1..=255).contains(&t) && s <= 4095;
            prop_assert_eq!(text.parse::<LogicAddr>().is_ok(), ok);
        }

        #[test]
        fn arbitrary_text_never_panics_and_valid_round_trips(text in "\\PC{0,16}") {
            if let Ok(a) = text.parse::<LogicAddr>() {
                // Only canonical forms with optional leading zeros parse; re-parse is stable.
                prop_assert_eq!(a.to_string().parse::<LogicAddr>().unwrap(), a);
            }
        }

        #[test]
        fn malformed_forms_rejected(
            a in "[0-9]{1,3}", b in "[0-9]{1,3}",
            junk in prop::sample::select(vec!["", ".", "..", " ", "+", "-", "a", ".1"]),
        ) {
            // Too few parts, signs, spaces, letters and extra parts are all rejected.
            for text in [
                format!("{a}.{b}"),
                format!("{a}.{b}.{junk}x"),
                format!("+{a}.{b}.1"),
                format!("{a}.{b}.1.{a}"),
                format!(" {a}.{b}.1"),
                format!("{a}.-{b}.1"),
            ] {
                prop_assert!(text.parse::<LogicAddr>().is_err(), "{} parsed", text);
            }
        }
    }
}
