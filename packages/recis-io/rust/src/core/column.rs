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
    /// Wide enough for every int64 and uint64 value; checked against the output dtype.
    Int(i128),
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
    /// Width of the fixed-size list at the leaf (inside any list levels), `None` when there is
    /// none; a width of 1 still gives a `(B, 1)` output.
    pub fixed: Option<usize>,
    pub leaf: Leaf,
    pub out: DType,
}

impl ColumnPlan {
    /// Offset arrays handed out: the list levels, plus one for the bytes of unhashed strings.
    pub fn ragged_levels(&self) -> usize {
        self.list_levels + usize::from(self.leaf == Leaf::Text && self.spec.hash.is_none())
    }

    /// Output elements per innermost item: the fixed-size list width, else 1.
    pub fn width(&self) -> usize {
        self.fixed.unwrap_or(1)
    }

    /// Whether the column's text leaf is UTF-8 strings (not bytes), by its type, whatever its
    /// fields are named.
    pub fn text_is_utf8(&self) -> bool {
        let mut dt = &self.file_type;
        loop {
            dt = match dt {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    f.data_type()
                }
                DataType::Dictionary(_, v) => v,
                other => {
                    return matches!(
                        other,
                        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                    )
                }
            };
        }
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
        // List levels, then at most one fixed-size list of numbers or strings at the leaf:
        // a fixed-size list of lists (or of fixed-size lists) has no output layout.
        while let DataType::List(f) | DataType::LargeList(f) = dt {
            list_levels += 1;
            dt = f.data_type();
        }
        let mut fixed = None;
        if let DataType::FixedSizeList(f, k) = dt {
            fixed = Some(
                usize::try_from(*k)
                    .ok()
                    .filter(|&k| k > 0)
                    .ok_or_else(unsupported)?,
            );
            dt = f.data_type();
        }
        let leaf = match dt {
            t if is_text(t) => Leaf::Text,
            // Read as its strings (hashed once per distinct value when `hash` is set).
            DataType::Dictionary(_, v) if is_text(v) => Leaf::Text,
            // Read as its values, like a plain column of the dictionary's value type.
            DataType::Dictionary(_, v) => {
                Leaf::Number(DType::from_arrow(v).ok_or_else(unsupported)?)
            }
            other => Leaf::Number(DType::from_arrow(other).ok_or_else(unsupported)?),
        };
        let out = check_options(spec, leaf, fixed)?;
        check_fill(spec, out)?;
        let plan = ColumnPlan {
            spec: spec.clone(),
            file_type: field.data_type().clone(),
            list_levels,
            fixed,
            leaf,
            out,
        };
        plan.check_text_fill()?;
        Ok(plan)
    }

    /// Refuses a fill that is not UTF-8 for a column of UTF-8 strings: its nulls would read as
    /// bytes no string column may hold (a bytes column takes any fill).
    fn check_text_fill(&self) -> Result<()> {
        let Some(Fill::Text(bytes)) = &self.spec.fill else {
            return Ok(());
        };
        if self.leaf != Leaf::Text || self.spec.hash.is_some() || !self.text_is_utf8() {
            return Ok(());
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::InvalidArgument(format!(
                "column '{}' holds UTF-8 strings, its fill is not UTF-8 (invalid byte at \
                 offset {}): give a str, or bytes that are UTF-8",
                self.spec.name,
                e.valid_up_to()
            ))),
        }
    }
}

fn is_text(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::Utf8View
            | DataType::BinaryView
    )
}

fn check_options(spec: &ColumnSpec, leaf: Leaf, fixed: Option<usize>) -> Result<DType> {
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
            if spec.dtype.is_some() || fixed.is_some() {
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

/// The integers `d` holds, `None` for floats.
fn int_range(d: DType) -> Option<(i128, i128)> {
    Some(match d {
        DType::Bool => (0, 1),
        DType::I8 => (i8::MIN.into(), i8::MAX.into()),
        DType::I16 => (i16::MIN.into(), i16::MAX.into()),
        DType::I32 => (i32::MIN.into(), i32::MAX.into()),
        DType::I64 => (i64::MIN.into(), i64::MAX.into()),
        DType::U8 => (0, u8::MAX.into()),
        DType::U16 => (0, u16::MAX.into()),
        DType::U32 => (0, u32::MAX.into()),
        DType::U64 => (0, u64::MAX.into()),
        DType::F16 | DType::F32 | DType::F64 => return None,
    })
}

/// The largest finite value of a float dtype.
fn float_max(d: DType) -> f64 {
    match d {
        DType::F16 => half::f16::MAX.to_f64(),
        DType::F32 => f32::MAX.into(),
        _ => f64::MAX,
    }
}

/// Refuses a fill the output dtype cannot hold, so a null never reads as a wrapped or
/// truncated value.
fn check_fill(spec: &ColumnSpec, out: DType) -> Result<()> {
    let name = &spec.name;
    let fits = match (&spec.fill, int_range(out)) {
        (None | Some(Fill::Text(_)), _) => return Ok(()),
        (Some(Fill::Int(v)), Some((lo, hi))) => (lo..=hi).contains(v),
        // `as` saturates, so a huge float lands outside every range.
        (Some(Fill::Float(v)), Some((lo, hi))) => {
            v.is_finite() && v.fract() == 0.0 && (lo..=hi).contains(&(*v as i128))
        }
        (Some(Fill::Int(v)), None) => (*v as f64).abs() <= float_max(out),
        (Some(Fill::Float(v)), None) => !v.is_finite() || v.abs() <= float_max(out),
    };
    if fits {
        return Ok(());
    }
    let shown = match &spec.fill {
        Some(Fill::Int(v)) => v.to_string(),
        Some(Fill::Float(v)) => format!("{v:?}"),
        _ => String::new(),
    };
    let range = match int_range(out) {
        Some((lo, hi)) => format!("an integer in [{lo}, {hi}]"),
        None => format!("a value in [-{m:e}, {m:e}] or nan/inf", m = float_max(out)),
    };
    Err(Error::InvalidArgument(format!(
        "column '{name}' has fill {shown}, out of range for {}: expected {range}",
        out.name()
    )))
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

    fn plan_of(dt: DataType, spec: &ColumnSpec) -> Result<ColumnPlan> {
        ColumnPlan::resolve(spec, &Field::new(&spec.name, dt, true))
    }

    fn fsl(dt: DataType, k: i32) -> DataType {
        DataType::FixedSizeList(Arc::new(Field::new("item", dt, true)), k)
    }

    fn list(dt: DataType) -> DataType {
        DataType::List(Arc::new(Field::new("item", dt, true)))
    }

    #[test]
    fn fixed_size_lists_keep_their_width_and_level() {
        let spec = ColumnSpec::plain("x");
        let one = plan_of(fsl(DataType::Int64, 1), &spec).unwrap();
        assert_eq!((one.fixed, one.list_levels, one.width()), (Some(1), 0, 1));
        let nested = plan_of(list(fsl(DataType::Int32, 2)), &spec).unwrap();
        assert_eq!(
            (nested.fixed, nested.list_levels, nested.width()),
            (Some(2), 1, 2)
        );
        let plain = plan_of(DataType::Int64, &spec).unwrap();
        assert_eq!((plain.fixed, plain.width()), (None, 1));
        for k in [1, 2] {
            let err = plan_of(fsl(list(DataType::Int64), k), &spec).unwrap_err();
            assert!(
                matches!(&err, Error::Schema(m) if m.contains("unsupported type")),
                "{err}"
            );
        }
    }

    #[test]
    fn dictionary_strings_are_text() {
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
        let mut spec = ColumnSpec::plain("c");
        assert_eq!(plan_of(dict.clone(), &spec).unwrap().leaf, Leaf::Text);
        spec.hash = Some(HashKind::Farm);
        assert_eq!(plan_of(dict, &spec).unwrap().out, DType::I64);
    }

    #[test]
    fn dictionary_numbers_read_as_their_values() {
        let dict = |k: DataType, v: DataType| DataType::Dictionary(Box::new(k), Box::new(v));
        let spec = ColumnSpec::plain("n");
        let plan = plan_of(dict(DataType::Int32, DataType::Int64), &spec).unwrap();
        assert_eq!(
            (plan.leaf, plan.out),
            (Leaf::Number(DType::I64), DType::I64)
        );
        let plan = plan_of(list(dict(DataType::Int8, DataType::Float32)), &spec).unwrap();
        assert_eq!((plan.list_levels, plan.out), (1, DType::F32));
        let err = plan_of(dict(DataType::Int32, DataType::Date32), &spec).unwrap_err();
        assert!(err.to_string().contains("unsupported type"), "{err}");
    }

    #[test]
    fn fills_must_fit_the_output_dtype() {
        let case = |dt: DataType, dtype: Option<DType>, fill: Fill| {
            let mut spec = ColumnSpec::plain("v");
            spec.dtype = dtype;
            spec.fill = Some(fill);
            plan_of(dt, &spec).map(|_| ()).map_err(|e| e.to_string())
        };
        let int8 = || (DataType::Int8, None);
        assert!(case(int8().0, int8().1, Fill::Int(127)).is_ok());
        let err = case(int8().0, int8().1, Fill::Int(1000)).unwrap_err();
        assert_eq!(
            err,
            "column 'v' has fill 1000, out of range for int8: expected an integer in [-128, 127]"
        );
        assert!(case(DataType::UInt8, None, Fill::Int(-1)).is_err());
        assert!(case(DataType::Int64, None, Fill::Float(2.9)).is_err());
        assert!(case(DataType::Int64, None, Fill::Float(f64::NAN)).is_err());
        assert!(case(DataType::Int64, None, Fill::Float(2.0)).is_ok());
        assert!(case(DataType::Int64, None, Fill::Int(1 << 63)).is_err());
        assert!(case(DataType::UInt64, None, Fill::Int(1 << 63)).is_ok());
        assert!(case(DataType::Boolean, None, Fill::Int(2)).is_err());
        assert!(case(DataType::Float32, Some(DType::F16), Fill::Int(70000)).is_err());
        assert!(case(
            DataType::Float32,
            Some(DType::F16),
            Fill::Float(f64::INFINITY)
        )
        .is_ok());
        assert!(case(DataType::Float64, None, Fill::Float(1e300)).is_ok());
    }

    #[test]
    fn string_fills_must_be_utf8_for_utf8_columns() {
        let case = |dt: DataType, fill: &[u8]| {
            let mut spec = ColumnSpec::plain("s");
            spec.fill = Some(Fill::Text(fill.to_vec()));
            plan_of(dt, &spec).map(|_| ()).map_err(|e| e.to_string())
        };
        let err = case(DataType::Utf8, b"ok\xff").unwrap_err();
        assert_eq!(
            err,
            "column 's' holds UTF-8 strings, its fill is not UTF-8 (invalid byte at offset 2): \
             give a str, or bytes that are UTF-8"
        );
        let dict = DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::LargeUtf8));
        assert!(case(list(dict), b"\xff").is_err());
        assert!(case(DataType::Utf8, "caf\u{e9}".as_bytes()).is_ok());
        assert!(case(DataType::Binary, b"\xff").is_ok());
        assert!(case(list(DataType::LargeBinary), b"\xff\xfe").is_ok());
    }
}
