//! Column options and how each file type maps onto an output tensor layout.

use arrow::datatypes::{DataType, Field};

use super::error::{Error, Result};
use super::hash::HashKind;

/// Element type of an output tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F16,
    F32,
    F64,
}

const DTYPES: [(DType, &str); 12] = [
    (DType::Bool, "bool"),
    (DType::I8, "int8"),
    (DType::I16, "int16"),
    (DType::I32, "int32"),
    (DType::I64, "int64"),
    (DType::U8, "uint8"),
    (DType::U16, "uint16"),
    (DType::U32, "uint32"),
    (DType::U64, "uint64"),
    (DType::F16, "float16"),
    (DType::F32, "float32"),
    (DType::F64, "float64"),
];

impl DType {
    pub fn name(self) -> &'static str {
        DTYPES
            .iter()
            .find(|(d, _)| *d == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DTYPES.iter().find(|(_, n)| *n == name).map(|(d, _)| *d)
    }

    /// Bytes per element in the output buffer (bools are one byte, like torch.bool).
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::I8 | DType::U8 => 1,
            DType::I16 | DType::U16 | DType::F16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::F32 | DType::F64)
    }

    pub fn arrow(self) -> DataType {
        match self {
            DType::Bool => DataType::Boolean,
            DType::I8 => DataType::Int8,
            DType::I16 => DataType::Int16,
            DType::I32 => DataType::Int32,
            DType::I64 => DataType::Int64,
            DType::U8 => DataType::UInt8,
            DType::U16 => DataType::UInt16,
            DType::U32 => DataType::UInt32,
            DType::U64 => DataType::UInt64,
            DType::F16 => DataType::Float16,
            DType::F32 => DataType::Float32,
            DType::F64 => DataType::Float64,
        }
    }

    fn from_arrow(dt: &DataType) -> Option<DType> {
        DTYPES.iter().map(|(d, _)| *d).find(|d| &d.arrow() == dt)
    }
}

/// Value written in place of a null.
#[derive(Clone, Debug, PartialEq)]
pub enum Fill {
    Int(i64),
    Float(f64),
    Text(Vec<u8>),
}

/// Per-column options given by the user.
#[derive(Clone, Debug)]
pub struct ColumnSpec {
    pub name: String,
    pub fill: Option<Fill>,
    pub hash: Option<HashKind>,
    pub buckets: u64,
    pub dtype: Option<DType>,
}

impl ColumnSpec {
    pub fn plain(name: &str) -> Self {
        ColumnSpec {
            name: name.to_string(),
            fill: None,
            hash: None,
            buckets: 0,
            dtype: None,
        }
    }
}

/// The innermost values of a column as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    Number(DType),
    Text,
}

/// How one column is read: the file type, its list levels and the output element type.
#[derive(Clone, Debug)]
pub struct ColumnPlan {
    pub spec: ColumnSpec,
    pub file_type: DataType,
    /// Variable-length list levels in the file (`list<list<x>>` has two).
    pub list_levels: usize,
    /// Width of a fixed-size list at the leaf, 1 when there is none.
    pub fixed: usize,
    pub leaf: Leaf,
    pub out: DType,
}

impl ColumnPlan {
    /// Offset arrays handed out: the list levels, plus one for the bytes of unhashed strings.
    pub fn ragged_levels(&self) -> usize {
        self.list_levels + usize::from(self.leaf == Leaf::Text && self.spec.hash.is_none())
    }

    pub fn resolve(spec: &ColumnSpec, field: &Field) -> Result<ColumnPlan> {
        let name = &spec.name;
        let unsupported = || {
            Error::Schema(format!(
                "column '{name}' has unsupported type {}",
                field.data_type()
            ))
        };
        let mut dt = field.data_type();
        let mut list_levels = 0;
        let mut fixed = 1;
        loop {
            match dt {
                DataType::List(f) | DataType::LargeList(f) if fixed == 1 => {
                    list_levels += 1;
                    dt = f.data_type();
                }
                DataType::FixedSizeList(f, k) if fixed == 1 && *k > 0 => {
                    fixed = *k as usize;
                    dt = f.data_type();
                }
                _ => break,
            }
        }
        let leaf = match dt {
            DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::Utf8View
            | DataType::BinaryView => Leaf::Text,
            other => Leaf::Number(DType::from_arrow(other).ok_or_else(unsupported)?),
        };
        let out = check_options(spec, leaf, fixed)?;
        Ok(ColumnPlan {
            spec: spec.clone(),
            file_type: field.data_type().clone(),
            list_levels,
            fixed,
            leaf,
            out,
        })
    }
}

fn check_options(spec: &ColumnSpec, leaf: Leaf, fixed: usize) -> Result<DType> {
    let name = &spec.name;
    if spec.buckets > 0 && spec.hash.is_none() {
        return Err(Error::InvalidArgument(format!(
            "column '{name}' sets buckets without hash"
        )));
    }
    match leaf {
        Leaf::Number(d) => {
            if spec.hash.is_some() {
                return Err(Error::Schema(format!(
                    "column '{name}' has type {}, hash needs a string column",
                    d.name()
                )));
            }
            if matches!(spec.fill, Some(Fill::Text(_))) {
                return Err(Error::InvalidArgument(format!(
                    "column '{name}' is numeric, its fill must be a number"
                )));
            }
            Ok(spec.dtype.unwrap_or(d))
        }
        Leaf::Text if spec.hash.is_some() => {
            if spec.dtype.is_some_and(|d| d != DType::I64) {
                return Err(Error::InvalidArgument(format!(
                    "column '{name}' is hashed to int64, dtype must be int64 or none"
                )));
            }
            if matches!(spec.fill, Some(Fill::Text(_) | Fill::Float(_))) {
                return Err(Error::InvalidArgument(format!(
                    "column '{name}' is hashed, its fill must be an integer id"
                )));
            }
            Ok(DType::I64)
        }
        Leaf::Text => {
            if spec.dtype.is_some() || fixed > 1 {
                return Err(Error::InvalidArgument(format!(
                    "column '{name}' holds strings, give hash= to turn them into ids"
                )));
            }
            if matches!(spec.fill, Some(Fill::Int(_) | Fill::Float(_))) {
                return Err(Error::InvalidArgument(format!(
                    "column '{name}' holds strings, its fill must be a string"
                )));
            }
            Ok(DType::U8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn nested_lists_count_levels() {
        let inner = Field::new("item", DataType::Int64, true);
        let l1 = Field::new("item", DataType::List(Arc::new(inner)), true);
        let f = Field::new("x", DataType::List(Arc::new(l1)), true);
        let plan = ColumnPlan::resolve(&ColumnSpec::plain("x"), &f).unwrap();
        assert_eq!(plan.list_levels, 2);
        assert_eq!(plan.ragged_levels(), 2);
        assert_eq!(plan.out, DType::I64);
    }

    #[test]
    fn strings_need_hash_for_dtype() {
        let f = Field::new("s", DataType::Utf8, true);
        let mut spec = ColumnSpec::plain("s");
        assert_eq!(ColumnPlan::resolve(&spec, &f).unwrap().ragged_levels(), 1);
        spec.dtype = Some(DType::I64);
        assert!(matches!(
            ColumnPlan::resolve(&spec, &f),
            Err(Error::InvalidArgument(_))
        ));
        spec.hash = Some(HashKind::Farm);
        assert_eq!(ColumnPlan::resolve(&spec, &f).unwrap().ragged_levels(), 0);
    }

    #[test]
    fn unsupported_types_are_schema_errors() {
        let f = Field::new("d", DataType::Date32, true);
        let err = ColumnPlan::resolve(&ColumnSpec::plain("d"), &f).unwrap_err();
        assert!(err.to_string().contains("unsupported type"));
    }
}
