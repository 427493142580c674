// The device page's live chart: an SVG string drawn from the series, no library (nothing is
// downloaded at run time). Loss is scaled to the left axis (0 to its largest value), accuracy to
// the right axis (0 to 1); x is the step.
//
//   chartSvg({ loss: [[1, 2.3], [2, 2.1]], accuracy: [[1, 0.1], [2, 0.2]], valAccuracy: [] })

const WIDTH = 640;
const HEIGHT = 260;
const PAD = { left: 48, right: 48, top: 16, bottom: 28 };

/** A number as the axes print it: 3 significant digits. */
export const tick = (value) => Number(value.toPrecision(3)).toString();

/**
 * Map points [[x, y], ...] to SVG coordinates, x over [0, xMax], y over [0, yMax].
 * @returns {string} the `points` attribute of a polyline
 */
export function polylinePoints(points, xMax, yMax, width = WIDTH, height = HEIGHT) {
  const w = width - PAD.left - PAD.right;
  const h = height - PAD.top - PAD.bottom;
  return points.map(([x, y]) => {
    const sx = PAD.left + (xMax > 0 ? x / xMax : 0) * w;
    const sy = PAD.top + h - (yMax > 0 ? Math.min(y, yMax) / yMax : 0) * h;
    return `${sx.toFixed(1)},${sy.toFixed(1)}`;
  }).join(' ');
}

/**
 * The chart as one SVG element's markup.
 * @param {{loss: number[][], accuracy: number[][], valAccuracy?: number[][]}} series
 */
export function chartSvg({ loss, accuracy, valAccuracy = [] }) {
  const all = [...loss, ...accuracy, ...valAccuracy];
  const xMax = Math.max(1, ...all.map(([x]) => x));
  const lossMax = Math.max(1e-9, ...loss.map(([, y]) => y).filter(Number.isFinite));
  const bottom = HEIGHT - PAD.bottom;
  const right = WIDTH - PAD.right;
  const line = (points, yMax, color, name, dash = '') => (points.length
    ? `<polyline data-series="${name}" fill="none" stroke="${color}" stroke-width="1.5"${dash}`
      + ` points="${polylinePoints(points, xMax, yMax)}"/>` : '');
  return `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${WIDTH} ${HEIGHT}" role="img" `
    + `aria-label="training loss and accuracy by step">`
    + `<rect x="${PAD.left}" y="${PAD.top}" width="${right - PAD.left}" height="${bottom - PAD.top}" `
    + 'fill="none" stroke="#bbb"/>'
    + `<text x="${PAD.left - 4}" y="${PAD.top + 10}" text-anchor="end" font-size="11" fill="#c0392b">`
    + `${tick(lossMax)}</text>`
    + `<text x="${PAD.left - 4}" y="${bottom}" text-anchor="end" font-size="11" fill="#c0392b">0</text>`
    + `<text x="${right + 4}" y="${PAD.top + 10}" font-size="11" fill="#2471a3">1</text>`
    + `<text x="${right + 4}" y="${bottom}" font-size="11" fill="#2471a3">0</text>`
    + `<text x="${right}" y="${HEIGHT - 8}" text-anchor="end" font-size="11">step ${xMax}</text>`
    + `<text x="${PAD.left}" y="${HEIGHT - 8}" font-size="11"><tspan fill="#c0392b">loss</tspan> `
    + '<tspan fill="#2471a3">accuracy</tspan> <tspan fill="#1e8449">test accuracy</tspan></text>'
    + line(loss, lossMax, '#c0392b', 'loss')
    + line(accuracy, 1, '#2471a3', 'accuracy')
    + line(valAccuracy, 1, '#1e8449', 'val_accuracy', ' stroke-dasharray="4 3"')
    + '</svg>';
}
