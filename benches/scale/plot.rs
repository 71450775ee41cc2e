//! Line charts as PNG files, with nothing but the standard library: a canvas of palette
//! indexes, lines, a 5×7 bitmap font of our own, and a PNG writer (16 colours, 4 bits a pixel;
//! deflate with the fixed Huffman codes and runs only, which is all a chart of flat colour
//! needs: a chart is a few KB). For the benchmarks' curves: cost per unit against scale, the
//! x axis logarithmic where it spans decades.
#![allow(dead_code)]

use std::path::Path;

const W: usize = 720;
const H: usize = 440;
const LEFT: usize = 90;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 60;
/// The palette: white, black, grey, then the series' colours.
const PALETTE: [[u8; 3]; 7] = [
    [255, 255, 255],
    [0, 0, 0],
    [200, 200, 200],
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
];
const BLACK: u8 = 1;
const GREY: u8 = 2;
/// Series colours (palette indexes), in turn.
const COLOURS: [u8; 4] = [3, 4, 5, 6];

/// One curve: its name (for the legend) and its points (x, y).
pub(crate) struct Series<'a> {
    pub(crate) name: &'a str,
    pub(crate) points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, and whether x is logarithmic.
pub(crate) struct Chart<'a> {
    pub(crate) title: &'a str,
    pub(crate) x_label: &'a str,
    pub(crate) y_label: &'a str,
    pub(crate) log_x: bool,
}

/// Palette indexes, a byte a pixel, rows top first.
struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { px: vec![0; W * H] }
    }

    fn set(&mut self, x: i64, y: i64, c: u8) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    /// A line, `thick` pixels wide (Bresenham, with a square pen).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: u8, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..thick {
                for oy in 0..thick {
                    self.set(x + ox - thick / 2, y + oy - thick / 2, c);
                }
            }
            if x == x1 && y == y1 {
                return;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at (x, y), its top left corner, `scale` pixels per font pixel.
    fn text(&mut self, x: i64, y: i64, s: &str, c: u8, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for ox in 0..scale {
                            for oy in 0..scale {
                                self.set(
                                    x + (i as i64 * 6 + col) * scale + ox,
                                    y + r as i64 * scale + oy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn (reading upwards), its bottom left corner at (x, y).
    fn text_up(&mut self, x: i64, y: i64, s: &str, c: u8, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            for (r, bits) in glyph(ch).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for ox in 0..scale {
                            for oy in 0..scale {
                                self.set(
                                    x + r as i64 * scale + ox,
                                    y - (i as i64 * 6 + col) * scale - oy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Width in pixels of `s` at `scale`.
fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

/// A number as a tick label: 3 significant digits at most, thousands as k, millions as M.
fn label(v: f64) -> String {
    let (v, unit) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e4 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if v == v.trunc() || v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    };
    format!("{s}{unit}")
}

/// A "nice" step for about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Draws `series` on `chart` into a PNG at `path`.
pub(crate) fn draw(path: &Path, chart: &Chart<'_>, series: &[Series<'_>]) -> std::io::Result<()> {
    let mut c = Canvas::new();
    let (grey, black) = (GREY, BLACK);
    let points = series.iter().flat_map(|s| s.points.iter().copied());
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    if x_min > x_max {
        (x_min, x_max) = (1.0, 10.0);
    }
    if chart.log_x {
        x_min = 10f64.powf(x_min.max(1e-9).log10().floor());
        x_max = 10f64.powf(x_max.max(1e-9).log10().ceil());
    }
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let y_step = nice_step(if y_max > 0.0 { y_max } else { 1.0 }, 5.0);
    let y_top = (y_max / y_step).ceil().max(1.0) * y_step;
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let fx = |x: f64| -> i64 {
        let t = if chart.log_x {
            (x.max(1e-9).log10() - x_min.log10()) / (x_max.log10() - x_min.log10())
        } else {
            (x - x_min) / (x_max - x_min)
        };
        LEFT as i64 + (t * pw).round() as i64
    };
    let fy = |y: f64| -> i64 { (TOP as f64 + ph - y / y_top * ph).round() as i64 };
    // Grid and tick labels.
    let mut y = 0.0;
    while y <= y_top + y_step / 2.0 {
        let py = fy(y);
        c.line((LEFT as i64, py), ((W - RIGHT) as i64, py), grey, 1);
        let l = label(y);
        c.text(LEFT as i64 - 8 - text_width(&l, 1), py - 3, &l, black, 1);
        y += y_step;
    }
    let x_ticks: Vec<f64> = if chart.log_x {
        let mut v = Vec::new();
        let mut t = x_min;
        while t <= x_max * 1.0001 {
            v.push(t);
            t *= 10.0;
        }
        v
    } else {
        let step = nice_step(x_max - x_min, 6.0);
        let mut v = Vec::new();
        let mut t = (x_min / step).ceil() * step;
        while t <= x_max + step / 2.0 {
            v.push(t);
            t += step;
        }
        v
    };
    for t in x_ticks {
        let px = fx(t);
        c.line((px, TOP as i64), (px, (H - BOTTOM) as i64), grey, 1);
        let l = label(t);
        c.text(
            px - text_width(&l, 1) / 2,
            (H - BOTTOM) as i64 + 8,
            &l,
            black,
            1,
        );
    }
    // Axes and labels.
    c.line(
        (LEFT as i64, (H - BOTTOM) as i64),
        ((W - RIGHT) as i64, (H - BOTTOM) as i64),
        black,
        1,
    );
    c.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (H - BOTTOM) as i64),
        black,
        1,
    );
    c.text(
        (W as i64 - text_width(chart.title, 2)) / 2,
        12,
        chart.title,
        black,
        2,
    );
    let xl = if chart.log_x {
        format!("{} (log scale)", chart.x_label)
    } else {
        chart.x_label.to_owned()
    };
    c.text(
        LEFT as i64 + (pw as i64 - text_width(&xl, 1)) / 2,
        (H - 24) as i64,
        &xl,
        black,
        1,
    );
    c.text_up(
        18,
        TOP as i64 + (ph as i64 + text_width(chart.y_label, 1)) / 2,
        chart.y_label,
        black,
        1,
    );
    // Curves, each point marked, and the legend.
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(i64, i64)> = s.points.iter().map(|&(x, y)| (fx(x), fy(y))).collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], colour, 2);
        }
        for &(x, y) in &pts {
            for d in -3..=3 {
                c.line((x - 3, y + d), (x + 3, y + d), colour, 1);
            }
        }
        let ly = TOP as i64 + 8 + i as i64 * 14;
        let lx = (W - RIGHT) as i64 - 10 - text_width(s.name, 1) - 24;
        c.line((lx, ly + 3), (lx + 16, ly + 3), colour, 3);
        c.text(lx + 22, ly, s.name, black, 1);
    }
    std::fs::write(path, png(&c.px, W, H))
}

/// The PNG of `px` (palette indexes below 16, rows top first): 4 bits a pixel.
fn png(px: &[u8], w: usize, h: usize) -> Vec<u8> {
    // Filter byte 0 before each row, then the row two pixels a byte, the first in the high
    // half.
    let mut raw = Vec::with_capacity((w.div_ceil(2) + 1) * h);
    for row in px.chunks(w) {
        raw.push(0);
        for pair in row.chunks(2) {
            raw.push((pair[0] << 4) | pair.get(1).copied().unwrap_or(0));
        }
    }
    let mut z = vec![0x78, 0x01];
    z.extend_from_slice(&deflate_runs(&raw));
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    // 4 bits, colour type 3 (palette), deflate, filters, no interlace.
    ihdr.extend_from_slice(&[4, 3, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let plte: Vec<u8> = PALETTE.iter().flatten().copied().collect();
    chunk(&mut out, b"PLTE", &plte);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Bits, least significant first, as deflate packs them.
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, bits: u32) {
        self.acc |= value << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code: its bits go most significant first.
    fn code(&mut self, code: u32, bits: u32) {
        let mut rev = 0;
        for i in 0..bits {
            rev |= ((code >> i) & 1) << (bits - 1 - i);
        }
        self.put(rev, bits);
    }

    /// A literal or length symbol in the fixed code.
    fn symbol(&mut self, s: u32) {
        match s {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + s - 144, 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xC0 + s - 280, 8),
        }
    }
}

/// One deflate block with the fixed Huffman codes: literals, and runs of the byte before
/// (matches at distance 1).
fn deflate_runs(data: &[u8]) -> Vec<u8> {
    const BASE: [u32; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let mut b = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    // BFINAL, then BTYPE 01 (fixed codes).
    b.put(1, 1);
    b.put(1, 2);
    let mut i = 0;
    while i < data.len() {
        let mut run = 0;
        if i > 0 {
            while run < 258 && i + run < data.len() && data[i + run] == data[i - 1] {
                run += 1;
            }
        }
        if run >= 3 {
            let len = run as u32;
            let k = BASE.iter().rposition(|&l| l <= len).unwrap_or(0);
            b.symbol(257 + k as u32);
            b.put(len - BASE[k], EXTRA[k]);
            // Distance 1: code 0, five bits, no extra bits.
            b.code(0, 5);
            i += run;
        } else {
            b.symbol(u32::from(data[i]));
            i += 1;
        }
    }
    b.symbol(256);
    if b.n > 0 {
        b.out.push(b.acc as u8);
    }
    b.out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5_552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65_521;
        b %= 65_521;
    }
    (b << 16) | a
}

/// The 5×7 glyph of `ch` (rows top first, the 5 low bits of each, the leftmost the highest).
/// Lower case is drawn as upper case; what has no glyph is a small box.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        ' ' => [0; 7],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '÷' => [0, 0x04, 0, 0x1F, 0, 0x04, 0],
        '×' => [0, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0],
        'µ' => [0, 0, 0x11, 0x11, 0x11, 0x1E, 0x10],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// Checks the writer's checksums against known values (the smoke test calls it: a bench's
/// own tests do not run).
pub(crate) fn self_check() -> Result<(), String> {
    if crc32(b"IEND") != 0xAE42_6082 || adler32(b"Wikipedia") != 0x11E6_0398 {
        return Err("PNG checksums are wrong".into());
    }
    Ok(())
}
