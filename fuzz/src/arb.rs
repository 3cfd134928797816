//! Arbitrary values of any `Deserialize` type, driven by fuzzer bytes.
//!
//! A serde `Deserializer` that answers every request (a struct of these
//! fields, one of these enum variants, a sequence, a string, an integer)
//! from [`arbitrary::Unstructured`]. The types' own derived `Deserialize`
//! walks it, so every field and variant the protocol has (or gains) is
//! covered with no wrapper types in step with `protocol/`.

use arbitrary::Unstructured;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

/// Why no value could be built (the input ran out in a way serde could not
/// absorb, or a type asked for something this deserializer cannot give).
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

impl From<arbitrary::Error> for Error {
    fn from(e: arbitrary::Error) -> Self {
        Error(e.to_string())
    }
}

/// Longest sequence built: long enough to reach the frame limits through
/// byte vectors.
const MAX_SEQ: usize = 140 * 1024;
/// Most values built for one input, so a long sequence of structs (each
/// many values) stays as cheap as a long byte vector.
const BUDGET: usize = 150_000;

/// A value of `T` built from `u`.
pub fn value<T: DeserializeOwned>(u: &mut Unstructured<'_>) -> Result<T, Error> {
    let mut budget = BUDGET;
    T::deserialize(Deserializer {
        u,
        budget: &mut budget,
        depth: 0,
    })
}

struct Deserializer<'a, 'u> {
    u: &'a mut Unstructured<'u>,
    /// Values left to build; sequences end early once it runs out.
    budget: &'a mut usize,
    depth: u32,
}

impl<'a, 'u> Deserializer<'a, 'u> {
    fn child(&mut self) -> Result<Deserializer<'_, 'u>, Error> {
        if self.depth > 32 {
            return Err(Error("nested too deep".into()));
        }
        *self.budget = self.budget.saturating_sub(1);
        Ok(Deserializer {
            u: self.u,
            budget: self.budget,
            depth: self.depth + 1,
        })
    }

    fn len(&mut self) -> Result<usize, Error> {
        // Mostly short sequences, rarely long ones (stdio chunks near the
        // limits: slow to build, so not too often).
        let big = self.u.arbitrary::<u8>()? == u8::MAX;
        let n = if big {
            self.u.int_in_range(0..=MAX_SEQ)?
        } else {
            self.u.int_in_range(0..=8)?
        };
        Ok(n)
    }
}

macro_rules! prim {
    ($($method:ident => $visit:ident: $t:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
            v.$visit(self.u.arbitrary::<$t>()?)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Deserializer<'_, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, Error> {
        Err(Error("self-describing formats are not supported".into()))
    }

    prim! {
        deserialize_bool => visit_bool: bool,
        deserialize_i8 => visit_i8: i8,
        deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64,
        deserialize_i128 => visit_i128: i128,
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64,
        deserialize_u128 => visit_u128: u128,
        deserialize_f32 => visit_f32: f32,
        deserialize_f64 => visit_f64: f64,
        deserialize_char => visit_char: char,
        deserialize_string => visit_string: String,
        deserialize_str => visit_string: String,
        deserialize_bytes => visit_byte_buf: Vec<u8>,
        deserialize_byte_buf => visit_byte_buf: Vec<u8>,
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, Error> {
        if self.u.arbitrary::<bool>()? {
            v.visit_some(self.child()?)
        } else {
            v.visit_none()
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self.child()?)
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, Error> {
        let n = self.len()?;
        v.visit_seq(Seq {
            d: self.child()?,
            left: n,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(mut self, len: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq {
            d: self.child()?,
            left: len,
        })
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(len, v)
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, v: V) -> Result<V::Value, Error> {
        let n = self.len()?;
        v.visit_map(Seq {
            d: self.child()?,
            left: n,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_tuple(fields.len(), v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let last = u32::try_from(variants.len().saturating_sub(1)).unwrap_or(u32::MAX);
        let index = self.u.int_in_range(0..=last)?;
        v.visit_enum(Enum {
            d: self.child()?,
            index,
        })
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_u32(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

struct Seq<'a, 'u> {
    d: Deserializer<'a, 'u>,
    left: usize,
}

impl<'de> SeqAccess<'de> for Seq<'_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        if self.left == 0 || *self.d.budget == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.d.child()?).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

impl<'de> MapAccess<'de> for Seq<'_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        if self.left == 0 || *self.d.budget == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(self.d.child()?).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(self.d.child()?)
    }
}

struct Enum<'a, 'u> {
    d: Deserializer<'a, 'u>,
    index: u32,
}

impl<'de, 'a, 'u> EnumAccess<'de> for Enum<'a, 'u> {
    type Error = Error;
    type Variant = Deserializer<'a, 'u>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Error> {
        let index: de::value::U32Deserializer<Error> = self.index.into_deserializer();
        let v = seed.deserialize(index)?;
        Ok((v, self.d))
    }
}

impl<'de> VariantAccess<'de> for Deserializer<'_, '_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_tuple(self, len, v)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_tuple(self, fields.len(), v)
    }
}
