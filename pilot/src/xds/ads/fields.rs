//! Protobuf messages read field by field as their bytes arrive, so that a
//! request of megabytes is never held whole: only a field cut between two
//! reads is kept, and fields the reader does not want are skipped unread.

use prost::encoding::WireType;
use tonic::Status;

/// What a message reader wants of its fields.
pub(super) trait Fields {
    /// Whether field `tag` is read (all such fields are length-delimited);
    /// the others are skipped.
    fn reads(tag: u32) -> bool;

    /// The value of a field that is read, whole.
    fn field(&mut self, tag: u32, value: &[u8]) -> Result<(), Status>;
}

/// A message's bytes as they come, handed out as whole fields.
#[derive(Default)]
pub(super) struct FieldReader {
    /// The field being read, when the bytes so far hold only part of it.
    partial: Vec<u8>,
    /// Bytes still to skip of a field that is not read.
    skip: usize,
}

impl FieldReader {
    /// Starts a message, dropping what is left of one that failed.
    pub(super) fn begin(&mut self) {
        self.partial = Vec::new();
        self.skip = 0;
    }

    /// Reads the next bytes of the message.
    pub(super) fn take<F: Fields>(
        &mut self,
        fields: &mut F,
        mut bytes: &[u8],
    ) -> Result<(), Status> {
        // A field begun in earlier bytes is completed first, with no more
        // bytes than it needs, so that the rest is read where it lies.
        while !self.partial.is_empty() {
            let wanted = match Field::at::<F>(&self.partial)? {
                Some(field) if F::reads(field.tag) => field.header + field.len - self.partial.len(),
                // A skipped field's value is not held.
                Some(_) => 0,
                None => 1,
            };
            let (more, rest) = bytes.split_at(wanted.min(bytes.len()));
            self.partial.extend_from_slice(more);
            bytes = rest;
            let partial = std::mem::take(&mut self.partial);
            let read = self.read_fields(fields, &partial)?;
            if read < partial.len() {
                self.partial = partial;
                if bytes.is_empty() {
                    return Ok(());
                }
            }
        }
        let read = self.read_fields(fields, bytes)?;
        self.partial.extend_from_slice(&bytes[read..]);
        Ok(())
    }

    /// Whether nothing of a message is held.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.partial.capacity() == 0 && self.skip == 0
    }

    /// Ends the message: an error if it ends inside a field.
    pub(super) fn finish(&mut self) -> Result<(), Status> {
        let inside = !self.partial.is_empty() || self.skip > 0;
        self.begin();
        if inside {
            return Err(malformed("the request ends inside a field"));
        }
        Ok(())
    }

    /// Reads the whole fields at the front of `buf`: how many bytes they
    /// take.
    fn read_fields<F: Fields>(&mut self, fields: &mut F, buf: &[u8]) -> Result<usize, Status> {
        let mut read = 0;
        loop {
            let skipped = self.skip.min(buf.len() - read);
            self.skip -= skipped;
            read += skipped;
            if self.skip > 0 {
                return Ok(read);
            }
            let Some(field) = Field::at::<F>(&buf[read..])? else {
                return Ok(read);
            };
            if !F::reads(field.tag) {
                read += field.header;
                self.skip = field.len;
                continue;
            }
            let Some(value) = buf[read + field.header..].get(..field.len) else {
                return Ok(read);
            };
            fields.field(field.tag, value)?;
            read += field.header + field.len;
        }
    }
}

/// A request that cannot be read, and why.
pub(super) fn malformed(what: &str) -> Status {
    Status::invalid_argument(format!("malformed request: {what}"))
}

/// Merges a message field's value into `into`, as protobuf merges a
/// message field that comes more than once.
pub(super) fn merge<M: prost::Message + Default>(
    into: &mut Option<M>,
    value: &[u8],
    what: &str,
) -> Result<(), Status> {
    into.get_or_insert_with(M::default)
        .merge(value)
        .map_err(|e| malformed(&format!("{what}: {e}")))
}

/// A field's value as a string.
pub(super) fn text(value: &[u8]) -> Result<String, Status> {
    std::str::from_utf8(value)
        .map(str::to_string)
        .map_err(|_| malformed("a string field is not valid UTF-8"))
}

/// A field's key and length, as read from the front of a buffer.
struct Field {
    tag: u32,
    /// The bytes of the key and length.
    header: usize,
    /// The bytes of the value.
    len: usize,
}

impl Field {
    /// The field at the front of `buf`; `None` when `buf` ends inside its
    /// key or length.
    fn at<F: Fields>(buf: &[u8]) -> Result<Option<Field>, Status> {
        let mut rest = buf;
        let Some(key) = varint(&mut rest)? else {
            return Ok(None);
        };
        let tag = u32::try_from(key >> 3)
            .ok()
            .filter(|t| *t != 0)
            .ok_or_else(|| malformed("a field number is out of range"))?;
        let wire_type =
            WireType::try_from(key & 7).map_err(|_| malformed("a wire type is not valid"))?;
        let len = match wire_type {
            WireType::Varint => match varint(&mut rest)? {
                Some(_) => 0,
                None => return Ok(None),
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => match varint(&mut rest)? {
                Some(len) => usize::try_from(len)
                    .map_err(|_| malformed("a field's length is out of range"))?,
                None => return Ok(None),
            },
            WireType::StartGroup | WireType::EndGroup => {
                return Err(malformed("groups are not supported"));
            }
        };
        let field = Field {
            tag,
            header: buf.len() - rest.len(),
            len,
        };
        if F::reads(tag) && wire_type != WireType::LengthDelimited {
            return Err(malformed(&format!("field {tag} has the wrong wire type")));
        }
        Ok(Some(field))
    }
}

/// A varint from the front of `buf`, advancing past it; `None` when `buf`
/// ends inside it.
fn varint(buf: &mut &[u8]) -> Result<Option<u64>, Status> {
    if !buf.iter().take(10).any(|b| b & 0x80 == 0) {
        return if buf.len() >= 10 {
            Err(malformed("a varint is too long"))
        } else {
            Ok(None)
        };
    }
    prost::encoding::decode_varint(buf)
        .map(Some)
        .map_err(|e| malformed(&e.to_string()))
}
