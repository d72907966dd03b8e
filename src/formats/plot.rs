//! Small PNG charts for the dataset card: overlaid histograms and a bar chart
//! on a pixel grid. They carry no text (no font is needed, and the bytes are
//! the same on every machine); the card's Markdown gives each its title,
//! axis range and legend.

use anyhow::Result;

const WIDTH: usize = 480;
const HEIGHT: usize = 240;
const MARGIN: usize = 12;
const BINS: usize = 30;
const BACKGROUND: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [120, 120, 120];
/// The card's colours: blue for chosen, orange for rejected.
pub const BLUE: [u8; 3] = [31, 119, 180];
pub const ORANGE: [u8; 3] = [255, 127, 14];

/// One histogram of an overlay.
pub struct Series<'a> {
    pub values: &'a [f64],
    pub color: [u8; 3],
}

struct Canvas {
    rgb: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas { rgb: BACKGROUND.repeat(WIDTH * HEIGHT) }
    }

    /// Fills `x0..x1` x `y0..y1` (y from the bottom of the plot area), blending
    /// half of `color` into what is there, so overlaid bars both show.
    fn fill(&mut self, (x0, x1): (usize, usize), (y0, y1): (usize, usize), color: [u8; 3], blend: bool) {
        for y in y0..y1.min(HEIGHT - 2 * MARGIN) {
            let row = HEIGHT - MARGIN - 1 - y;
            for x in x0..x1.min(WIDTH - 2 * MARGIN) {
                let at = 3 * (row * WIDTH + MARGIN + x);
                for (c, &v) in color.iter().enumerate() {
                    let old = self.rgb[at + c];
                    self.rgb[at + c] =
                        if blend && old != BACKGROUND[c] { ((old as u16 + v as u16) / 2) as u8 } else { v };
                }
            }
        }
    }

    fn axes(&mut self) {
        self.fill((0, WIDTH - 2 * MARGIN), (0, 1), AXIS, false);
        let left = HEIGHT - 2 * MARGIN;
        for y in 0..left {
            let at = 3 * ((HEIGHT - MARGIN - 1 - y) * WIDTH + MARGIN - 1);
            self.rgb[at..at + 3].copy_from_slice(&AXIS);
        }
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&self.rgb)?;
        Ok(out)
    }
}

/// Overlaid histograms of `series` over their common range, `BINS` bins; the
/// PNG and the range `(low, high)`. Non-finite values are left out.
pub fn histogram(series: &[Series]) -> Result<(Vec<u8>, (f64, f64))> {
    let finite = || series.iter().flat_map(|s| s.values.iter().copied().filter(|v| v.is_finite()));
    let (mut lo, mut hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    } else if lo == hi {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|s| {
            let mut c = vec![0; BINS];
            for v in s.values.iter().filter(|v| v.is_finite()) {
                c[(((v - lo) / (hi - lo) * BINS as f64) as usize).min(BINS - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(0).max(1);
    let (w, h) = (WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN);
    let mut canvas = Canvas::new();
    for (s, c) in series.iter().zip(&counts) {
        for (bin, &n) in c.iter().enumerate() {
            let x = (bin * w / BINS + 1, (bin + 1) * w / BINS);
            canvas.fill(x, (1, 1 + n * (h - 2) / top), s.color, true);
        }
    }
    canvas.axes();
    Ok((canvas.png()?, (lo, hi)))
}

/// One bar per value, from zero to the largest value.
pub fn bars(values: &[f64], color: [u8; 3]) -> Result<Vec<u8>> {
    let top = values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
    let (w, h) = (WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN);
    let mut canvas = Canvas::new();
    let n = values.len().max(1);
    for (i, v) in values.iter().enumerate() {
        let height = if top > 0.0 && v.is_finite() { (v / top * (h - 2) as f64) as usize } else { 0 };
        canvas.fill((i * w / n + w / (4 * n), (i + 1) * w / n - w / (4 * n)), (1, 1 + height), color, false);
    }
    canvas.axes();
    canvas.png()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info, buf)
    }

    #[test]
    fn a_histogram_draws_both_series_over_their_range() {
        let (a, b) = ([1.0, 2.0, 2.0, 3.0], [2.0, 4.0, f64::NAN]);
        let (png, range) =
            histogram(&[Series { values: &a, color: BLUE }, Series { values: &b, color: ORANGE }]).unwrap();
        assert_eq!(range, (1.0, 4.0));
        let (info, pixels) = decode(&png);
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        let has = |c: [u8; 3]| pixels.chunks(3).any(|p| p == c);
        assert!(has(BLUE) && has(ORANGE), "both colours drawn");
        let blend: Vec<u8> = BLUE.iter().zip(ORANGE).map(|(x, y)| ((*x as u16 + y as u16) / 2) as u8).collect();
        assert!(pixels.chunks(3).any(|p| p == blend.as_slice()), "the shared bin (2.0) blends");
    }

    #[test]
    fn bars_scale_to_the_largest_value() {
        let (_, pixels) = decode(&bars(&[1.0, 2.0], BLUE).unwrap());
        let column = |x: usize| (0..HEIGHT).filter(|y| pixels[3 * (y * WIDTH + x)..][..3] == BLUE).count();
        let (w, n) = (WIDTH - 2 * MARGIN, 2);
        let (first, second) = (column(MARGIN + w / (2 * n)), column(MARGIN + w / n + w / (2 * n)));
        assert!(second > 0 && (first as f64 / second as f64 - 0.5).abs() < 0.02, "{first} vs {second}");
    }
}
