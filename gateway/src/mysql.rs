//! The only MySQL protocol the gateway speaks: an ERR packet sent in place of the server's
//! greeting, so that a refused client reports a real server error instead of "lost connection".

/// `ER_UNKNOWN_ERROR`, what vtgate uses for its own refusals.
pub const ER_UNKNOWN_ERROR: u16 = 1105;
/// The generic SQLSTATE.
pub const SQLSTATE_GENERAL: &[u8; 5] = b"HY000";
/// Servers cap error messages at 512 bytes (`MYSQL_ERRMSG_SIZE`); so do we.
pub const MAX_MESSAGE: usize = 512;

/// An ERR packet at sequence 0 (the greeting's position): header (3-byte length, sequence 0),
/// `0xff`, the error code (little endian), `#` and the SQLSTATE, then the message (truncated to
/// [`MAX_MESSAGE`] bytes at a character boundary).
///
/// The `#SQLSTATE` marker is sent as vtgate and MariaDB's own clients expect; clients that
/// parse a greeting-position error without `CLIENT_PROTOCOL_41` (libmysqlclient, mysql_async)
/// show it at the start of the message text.
pub fn err_packet(code: u16, sqlstate: &[u8; 5], message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let len = 1 + 2 + 1 + sqlstate.len() + message.len();
    let mut p = Vec::with_capacity(4 + len);
    // `len` is at most 521: the 3-byte length never overflows.
    p.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    p.push(0); // sequence id
    p.push(0xff);
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(sqlstate);
    p.extend_from_slice(message);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_packet_layout() {
        let p = err_packet(ER_UNKNOWN_ERROR, SQLSTATE_GENERAL, "no primary");
        let payload_len = 1 + 2 + 1 + 5 + "no primary".len();
        assert_eq!(&p[..4], &[payload_len as u8, 0, 0, 0]);
        assert_eq!(p[4], 0xff);
        assert_eq!(u16::from_le_bytes([p[5], p[6]]), 1105);
        assert_eq!(&p[7..13], b"#HY000");
        assert_eq!(&p[13..], b"no primary");
        assert_eq!(p.len(), 4 + payload_len);
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let msg = "é".repeat(400); // 800 bytes
        let p = err_packet(1, SQLSTATE_GENERAL, &msg);
        let text = std::str::from_utf8(&p[13..]).expect("valid UTF-8");
        assert!(text.len() <= MAX_MESSAGE && text.len() >= MAX_MESSAGE - 1);
        let len = u32::from_le_bytes([p[0], p[1], p[2], 0]) as usize;
        assert_eq!(len, p.len() - 4);
    }
}
