//! Incremental XMPP stream framer (RFC 6120 §4, §11).
//!
//! Bytes go in with [`Framer::push`]; whole frames come out of
//! [`Framer::next`]: the XML declaration, the stream header, one complete
//! depth-1 element (a stanza or a nonza such as `<stream:features>`), a run
//! of whitespace keepalive, or the stream end. Raw bytes are kept exactly so
//! that a frame the proxy does not change is forwarded byte for byte.
//!
//! The cut is made by a small byte state machine (as moparisthebest's
//! xmpp-proxy `stanzafilter.rs` does), which is cheap and handles partial
//! reads; every emitted stanza is then checked for well-formedness with
//! quick-xml. `Ok(None)` means "incomplete, push more bytes"; an `Err` is a
//! protocol violation and carries the stream error condition to send
//! ([`FramerError::condition`]). After an error the framer stays failed.
//!
//! Bounds (RFC 6120 §11.1 restricted XML): maximum stanza size, maximum
//! nesting depth; DOCTYPE / ENTITY / other `<!` declarations, processing
//! instructions other than a leading XML declaration, and entity references
//! other than the five predefined ones and character references are
//! rejected. Comments are tolerated: dropped at stream level, kept verbatim
//! inside a stanza.

use quick_xml::events::Event;

use super::element::is_xml_name;

/// Default maximum size of one stanza (1 MiB).
pub const DEFAULT_MAX_STANZA_BYTES: usize = 1 << 20;
/// Default maximum element nesting depth inside one stanza.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Limits applied by a [`Framer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramerConfig {
    /// Maximum bytes of one frame (stanza or stream header).
    pub max_stanza_bytes: usize,
    /// Maximum element nesting depth inside a stanza (the stanza itself is 1).
    pub max_depth: usize,
}

impl Default for FramerConfig {
    fn default() -> Self {
        FramerConfig {
            max_stanza_bytes: DEFAULT_MAX_STANZA_BYTES,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// A protocol violation found while framing; each maps to a stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramerError {
    /// A stanza or header larger than the configured maximum.
    #[error("stanza larger than {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Elements nested deeper than the configured maximum.
    #[error("elements nested deeper than {limit}")]
    TooDeep {
        /// The configured limit.
        limit: usize,
    },
    /// Restricted XML (DTD, entity declaration, processing instruction, entity reference).
    #[error("restricted XML: {0}")]
    Restricted(&'static str),
    /// Not well-formed XML.
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// Bytes that are not UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// The first element is not a usable `<stream:stream>` header.
    #[error("bad stream header: {0}")]
    BadStreamHeader(String),
}

impl FramerError {
    /// The RFC 6120 §4.9.3 stream error condition to send for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            FramerError::TooLarge { .. } | FramerError::TooDeep { .. } => "policy-violation",
            FramerError::Restricted(_) => "restricted-xml",
            FramerError::NotWellFormed(_) => "not-well-formed",
            FramerError::InvalidUtf8 => "unsupported-encoding",
            FramerError::BadStreamHeader(_) => "invalid-namespace",
        }
    }
}

/// The opening `<stream:stream …>` tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The tag exactly as received.
    pub raw: Vec<u8>,
    /// Qualified name (normally `stream:stream`).
    pub name: String,
    /// All attributes, qualified names, values unescaped, in order.
    pub attrs: Vec<(String, String)>,
}

impl StreamHeader {
    /// The value of attribute `name` (qualified, e.g. `xml:lang`).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// `to`.
    pub fn to(&self) -> Option<&str> {
        self.attr("to")
    }
    /// `from`.
    pub fn from(&self) -> Option<&str> {
        self.attr("from")
    }
    /// `id`.
    pub fn id(&self) -> Option<&str> {
        self.attr("id")
    }
    /// `version`.
    pub fn version(&self) -> Option<&str> {
        self.attr("version")
    }
    /// `xml:lang`.
    pub fn lang(&self) -> Option<&str> {
        self.attr("xml:lang")
    }
    /// The namespace bound to `prefix` by this header (`""` → default).
    pub fn namespace_of(&self, prefix: &str) -> Option<&str> {
        if prefix.is_empty() {
            self.attr("xmlns")
        } else {
            self.attr(&format!("xmlns:{prefix}"))
        }
    }
}

/// One unit of an XMPP stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `<?xml …?>` (only allowed before the header).
    XmlDecl(Vec<u8>),
    /// The stream header.
    StreamHeader(StreamHeader),
    /// One complete depth-1 element, raw bytes, checked well-formed UTF-8.
    Stanza(Vec<u8>),
    /// Whitespace between stanzas (a keepalive, RFC 6120 §4.6.1).
    Whitespace(Vec<u8>),
    /// `</stream:stream>`, raw bytes.
    StreamEnd(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Outside,
    StartTag { quote: Option<u8> },
    EndTag,
    Comment,
    CData,
    Decl,
}

/// The incremental framer. See the module docs.
#[derive(Debug)]
pub struct Framer {
    cfg: FramerConfig,
    buf: Vec<u8>,
    /// Scan position in `buf`.
    pos: usize,
    /// Index of the `<` of the markup being scanned.
    tag_start: usize,
    lex: Lex,
    /// 0 before the header, 1 inside the stream, ≥2 inside a stanza.
    depth: usize,
    header_name: Option<String>,
    /// Name ranges (in `buf`) of the open elements of the current stanza.
    open: Vec<(usize, usize)>,
    decl_allowed: bool,
    ended: bool,
    failed: Option<FramerError>,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':' || b >= 0x80
}

impl Framer {
    /// A framer with the given limits, expecting a stream header.
    pub fn new(cfg: FramerConfig) -> Framer {
        Framer {
            cfg,
            buf: Vec::new(),
            pos: 0,
            tag_start: 0,
            lex: Lex::Outside,
            depth: 0,
            header_name: None,
            open: Vec::new(),
            decl_allowed: true,
            ended: false,
            failed: None,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet emitted in a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True once `</stream:stream>` has been emitted (until [`Framer::reset`]).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Stream restart (after STARTTLS `<proceed/>` or SASL `<success/>`,
    /// RFC 6120 §5.4.3.3, §6.4.6): expect a new XML declaration and header.
    /// Unconsumed bytes are kept; callers that must discard them (STARTTLS)
    /// check [`Framer::buffered`] and call [`Framer::clear`].
    pub fn reset(&mut self) {
        self.pos = 0;
        self.tag_start = 0;
        self.lex = Lex::Outside;
        self.depth = 0;
        self.header_name = None;
        self.open.clear();
        self.decl_allowed = true;
        self.ended = false;
        self.failed = None;
    }

    /// Discards unconsumed bytes.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.tag_start = 0;
        self.lex = Lex::Outside;
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, FramerError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.scan();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn take(&mut self, end: usize) -> Vec<u8> {
        let v: Vec<u8> = self.buf.drain(..end).collect();
        self.pos = 0;
        self.tag_start = 0;
        v
    }

    fn scan(&mut self) -> Result<Option<Frame>, FramerError> {
        loop {
            if self.pos > self.cfg.max_stanza_bytes {
                return Err(FramerError::TooLarge {
                    limit: self.cfg.max_stanza_bytes,
                });
            }
            let Some(&b) = self.buf.get(self.pos) else {
                // Out of bytes: flush stream-level whitespace.
                if self.depth <= 1 && self.lex == Lex::Outside && self.pos > 0 {
                    let ws = self.take(self.pos);
                    if self.depth == 1 && !self.ended {
                        return Ok(Some(Frame::Whitespace(ws)));
                    }
                }
                return Ok(None);
            };
            match self.lex {
                Lex::Outside => {
                    if b == b'<' {
                        if self.depth <= 1 && self.pos > 0 {
                            let ws = self.take(self.pos);
                            if self.depth == 1 && !self.ended {
                                return Ok(Some(Frame::Whitespace(ws)));
                            }
                        }
                        match self.classify()? {
                            None => return Ok(None),
                            Some(lex) => {
                                if self.ended {
                                    return Err(FramerError::NotWellFormed(
                                        "data after stream end".into(),
                                    ));
                                }
                                self.tag_start = self.pos;
                                self.lex = lex;
                                self.pos += match lex {
                                    Lex::Comment => 4,
                                    Lex::CData => 9,
                                    Lex::Decl => 5,
                                    _ => 1,
                                };
                                if !matches!(lex, Lex::Decl) {
                                    self.decl_allowed = false;
                                }
                            }
                        }
                    } else if self.depth <= 1 {
                        if !is_ws(b) {
                            return Err(FramerError::NotWellFormed(
                                "text outside of any stanza".into(),
                            ));
                        }
                        self.pos += 1;
                        // Stream-level whitespace is not a stanza: hand it
                        // on before it counts against the stanza limit, as
                        // it would be had the read ended here (the verdict
                        // must not depend on how the stream was cut; found
                        // by the xml_framer fuzz target).
                        if self.pos >= self.cfg.max_stanza_bytes {
                            let ws = self.take(self.pos);
                            if self.depth == 1 && !self.ended {
                                return Ok(Some(Frame::Whitespace(ws)));
                            }
                        }
                    } else {
                        self.pos += 1;
                    }
                }
                Lex::StartTag { quote } => {
                    match (quote, b) {
                        (None, b'"' | b'\'') => self.lex = Lex::StartTag { quote: Some(b) },
                        (Some(q), _) if q == b => self.lex = Lex::StartTag { quote: None },
                        (_, b'<') => {
                            return Err(FramerError::NotWellFormed("'<' inside a tag".into()));
                        }
                        (None, b'>') => {
                            let empty = self.pos > self.tag_start + 1
                                && self.buf.get(self.pos - 1) == Some(&b'/');
                            self.lex = Lex::Outside;
                            if let Some(f) = self.start_tag_done(empty)? {
                                return Ok(Some(f));
                            }
                            continue;
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
                Lex::EndTag => {
                    if b == b'>' {
                        self.lex = Lex::Outside;
                        if let Some(f) = self.end_tag_done()? {
                            return Ok(Some(f));
                        }
                        continue;
                    }
                    if b == b'<' {
                        return Err(FramerError::NotWellFormed("'<' inside a tag".into()));
                    }
                    self.pos += 1;
                }
                Lex::Comment => {
                    if b == b'>'
                        && self.pos >= self.tag_start + 6
                        && self.buf.get(self.pos - 2..self.pos) == Some(b"--")
                    {
                        self.lex = Lex::Outside;
                        if self.depth <= 1 {
                            // Stream-level comments are dropped.
                            self.take(self.pos + 1);
                            continue;
                        }
                    }
                    self.pos += 1;
                }
                Lex::CData => {
                    if b == b'>'
                        && self.pos >= self.tag_start + 11
                        && self.buf.get(self.pos - 2..self.pos) == Some(b"]]")
                    {
                        self.lex = Lex::Outside;
                    }
                    self.pos += 1;
                }
                Lex::Decl => {
                    if b == b'>' && self.buf.get(self.pos - 1) == Some(&b'?') {
                        self.lex = Lex::Outside;
                        self.decl_allowed = false;
                        let raw = self.take(self.pos + 1);
                        if std::str::from_utf8(&raw).is_err() {
                            return Err(FramerError::InvalidUtf8);
                        }
                        return Ok(Some(Frame::XmlDecl(raw)));
                    }
                    self.pos += 1;
                }
            }
        }
    }

    /// Decides what markup starts at `self.pos` (a `<`). `Ok(None)`: need more bytes.
    fn classify(&self) -> Result<Option<Lex>, FramerError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(&c) = rest.get(1) else {
            return Ok(None);
        };
        let prefix_of = |lit: &[u8]| rest.len() < lit.len() && lit.starts_with(rest);
        match c {
            b'?' => {
                if rest.len() >= 6 {
                    if rest.starts_with(b"<?xml")
                        && rest.get(5).copied().is_some_and(is_ws)
                        && self.decl_allowed
                        && self.depth == 0
                    {
                        Ok(Some(Lex::Decl))
                    } else {
                        Err(FramerError::Restricted("processing instruction"))
                    }
                } else if prefix_of(b"<?xml ") || (rest.len() == 5 && rest == b"<?xml") {
                    Ok(None)
                } else {
                    Err(FramerError::Restricted("processing instruction"))
                }
            }
            b'!' => {
                if rest.starts_with(b"<!--") {
                    Ok(Some(Lex::Comment))
                } else if rest.starts_with(b"<![CDATA[") {
                    if self.depth >= 2 {
                        Ok(Some(Lex::CData))
                    } else {
                        Err(FramerError::NotWellFormed("CDATA outside a stanza".into()))
                    }
                } else if prefix_of(b"<!--") || prefix_of(b"<![CDATA[") {
                    Ok(None)
                } else {
                    Err(FramerError::Restricted("DTD or markup declaration"))
                }
            }
            b'/' => Ok(Some(Lex::EndTag)),
            c if is_name_start(c) => Ok(Some(Lex::StartTag { quote: None })),
            _ => Err(FramerError::NotWellFormed("bad character after '<'".into())),
        }
    }

    /// Range of the element name of the start tag at `tag_start`.
    fn start_name(&self) -> (usize, usize) {
        let from = self.tag_start + 1;
        let len = self
            .buf
            .get(from..self.pos)
            .unwrap_or_default()
            .iter()
            .position(|&b| is_ws(b) || b == b'/' || b == b'>')
            .unwrap_or(self.pos.saturating_sub(from));
        (from, from + len)
    }

    /// Checks that the end tag ending at `pos` closes the innermost open element.
    fn check_end_name(&mut self) -> Result<(), FramerError> {
        let name = self
            .buf
            .get(self.tag_start + 2..self.pos)
            .unwrap_or_default()
            .trim_ascii_end();
        let open = self
            .open
            .pop()
            .and_then(|(a, b)| self.buf.get(a..b))
            .unwrap_or_default();
        if name != open {
            return Err(FramerError::NotWellFormed("mismatched end tag".into()));
        }
        Ok(())
    }

    fn start_tag_done(&mut self, empty: bool) -> Result<Option<Frame>, FramerError> {
        match self.depth {
            0 => {
                if empty {
                    return Err(FramerError::BadStreamHeader("empty stream element".into()));
                }
                let raw = self.take(self.pos + 1);
                let header = parse_header(raw)?;
                self.header_name = Some(header.name.clone());
                self.depth = 1;
                Ok(Some(Frame::StreamHeader(header)))
            }
            1 => {
                // A stream header is only valid at a restart (after
                // <proceed/> or SASL success, when the framer is reset):
                // one inside the stream would nest every later stanza.
                let (from, to) = self.start_name();
                if self.buf.get(from..to) == self.header_name.as_deref().map(str::as_bytes) {
                    return Err(FramerError::NotWellFormed(
                        "stream header inside the stream".into(),
                    ));
                }
                if empty {
                    let raw = self.take(self.pos + 1);
                    validate_stanza(&raw)?;
                    return Ok(Some(Frame::Stanza(raw)));
                }
                self.depth = 2;
                self.open.clear();
                let n = self.start_name();
                self.open.push(n);
                self.pos += 1;
                Ok(None)
            }
            d => {
                // The new element sits at nesting level `d` of the stanza.
                if d > self.cfg.max_depth {
                    return Err(FramerError::TooDeep {
                        limit: self.cfg.max_depth,
                    });
                }
                if !empty {
                    self.depth += 1;
                    let n = self.start_name();
                    self.open.push(n);
                }
                self.pos += 1;
                Ok(None)
            }
        }
    }

    fn end_tag_done(&mut self) -> Result<Option<Frame>, FramerError> {
        match self.depth {
            0 => Err(FramerError::NotWellFormed(
                "end tag before stream header".into(),
            )),
            1 => {
                let raw = self.take(self.pos + 1);
                let name = raw
                    .get(2..raw.len().saturating_sub(1))
                    .map(|n| n.trim_ascii())
                    .unwrap_or_default();
                if Some(name) != self.header_name.as_deref().map(str::as_bytes) {
                    return Err(FramerError::NotWellFormed(
                        "end tag does not close the stream".into(),
                    ));
                }
                self.depth = 0;
                self.ended = true;
                Ok(Some(Frame::StreamEnd(raw)))
            }
            2 => {
                self.check_end_name()?;
                self.depth = 1;
                let raw = self.take(self.pos + 1);
                validate_stanza(&raw)?;
                Ok(Some(Frame::Stanza(raw)))
            }
            _ => {
                self.check_end_name()?;
                self.depth -= 1;
                self.pos += 1;
                Ok(None)
            }
        }
    }
}

fn nwf(e: impl std::fmt::Display) -> FramerError {
    FramerError::NotWellFormed(e.to_string())
}

fn parse_header(raw: Vec<u8>) -> Result<StreamHeader, FramerError> {
    let text = std::str::from_utf8(&raw).map_err(|_| FramerError::InvalidUtf8)?;
    let mut reader = quick_xml::Reader::from_str(text);
    let (name, attrs) = match reader.read_event().map_err(nwf)? {
        Event::Start(e) => {
            let name = std::str::from_utf8(e.name().as_ref())
                .map_err(|_| FramerError::InvalidUtf8)?
                .to_owned();
            let mut attrs = Vec::new();
            for a in e.attributes() {
                let a = a.map_err(nwf)?;
                let k = std::str::from_utf8(a.key.as_ref())
                    .map_err(|_| FramerError::InvalidUtf8)?
                    .to_owned();
                let v = a
                    .unescape_value()
                    .map_err(|_| FramerError::Restricted("entity reference in stream header"))?;
                attrs.push((k, v.into_owned()));
            }
            (name, attrs)
        }
        _ => return Err(FramerError::BadStreamHeader("not a start tag".into())),
    };
    let header = StreamHeader { raw, name, attrs };
    let (prefix, local) = match header.name.split_once(':') {
        Some((p, l)) => (p, l),
        None => ("", header.name.as_str()),
    };
    if local != "stream" || header.namespace_of(prefix) != Some(super::ns::STREAMS) {
        return Err(FramerError::BadStreamHeader(format!(
            "expected stream in {}, got {}",
            super::ns::STREAMS,
            header.name
        )));
    }
    Ok(header)
}

fn check_refs_in(value: &[u8]) -> Result<(), FramerError> {
    let s = std::str::from_utf8(value).map_err(|_| FramerError::InvalidUtf8)?;
    quick_xml::escape::unescape(s)
        .map(|_| ())
        .map_err(|_| FramerError::Restricted("entity reference"))
}

/// Checks that `raw` is one well-formed UTF-8 element within the restricted
/// XML profile. Used on every emitted stanza.
pub fn validate_stanza(raw: &[u8]) -> Result<(), FramerError> {
    let text = std::str::from_utf8(raw).map_err(|_| FramerError::InvalidUtf8)?;
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    reader.config_mut().check_comments = true;
    loop {
        match reader.read_event().map_err(nwf)? {
            Event::Start(e) | Event::Empty(e) => {
                // quick-xml does not check names; `<a='x'>` must not pass.
                if !is_xml_name(e.name().as_ref()) {
                    return Err(nwf("invalid element name"));
                }
                for a in e.attributes() {
                    let a = a.map_err(nwf)?;
                    if !is_xml_name(a.key.as_ref()) {
                        return Err(nwf("invalid attribute name"));
                    }
                    check_refs_in(&a.value)?;
                }
            }
            Event::End(_) | Event::Text(_) | Event::CData(_) | Event::Comment(_) => {}
            Event::GeneralRef(r) => {
                if r.is_char_ref() {
                    match r.resolve_char_ref() {
                        Ok(Some(_)) => {}
                        _ => return Err(nwf("bad character reference")),
                    }
                } else if !matches!(r.as_ref(), b"lt" | b"gt" | b"amp" | b"apos" | b"quot") {
                    return Err(FramerError::Restricted("entity reference"));
                }
            }
            Event::DocType(_) => return Err(FramerError::Restricted("DOCTYPE")),
            Event::PI(_) | Event::Decl(_) => {
                return Err(FramerError::Restricted("processing instruction"));
            }
            Event::Eof => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
